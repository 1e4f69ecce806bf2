"""Multi-node local cluster (issue 13) on this machine: the local stack as a single node (`edp stack up`: a 2-CPU
head) and shaped like the chart (`edp stack up --workers 2`: a 0-CPU head and two worker nodes of 1 CPU, each its own
raylet), beside SeaweedFS, MLflow and Prometheus, started by this benchmark one after the other.
Smoke sweep: the chart's rendered RayJob entrypoint for cluster/configs/sweeps/smoke.yaml (3 trials, tiny models)
submitted to each stack's job server as KubeRay's submitter does, timed from submission to SUCCEEDED (the same
measure on both stacks: job start, runtime env, driver, Tune, trials, checkpoints in `EDP_CHECKPOINT_URI`).
Prepared data: `prepare` of the benchmark's data into an empty cache publishing to the stack's SeaweedFS (cold: spaCy
parse, vocabulary, vectors), into a second empty cache that fetches the published entry (what a node without it
does), and again (a local hit).
Serve node kill: the escm application of the Serve config (`serve deploy`, proxy on the head only) serving a tiny
ESCM (replies capped at 12 tokens) with one 1-CPU replica on each worker node; 4 closed-loop HTTP clients POST
/v1/respond without pause; after 10 s the raylet of worker-2 is SIGKILLed, the load runs 35 s more. Failed: non-200
answers and transport errors; recovery: from the kill to the end of the first success that started after the last
failure.
"""

from __future__ import annotations

import os
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def stack_running(state_dir: Path, workers: int):
    """`edp stack up [--workers N]` on free ports; yields (stack env, ports, seconds to up); `down` after."""
    from cluster.local import processes as ps
    from cluster.local import stack as st

    ports = dict(zip(st.DEFAULT_PORTS, ps.free_ports(len(st.DEFAULT_PORTS)), strict=True))
    t0 = time.perf_counter()
    try:
        state = st.up(state_dir, ports, workers=workers, log=lambda line: None)
        up_s = time.perf_counter() - t0
        yield st.stack_env(st.Stack.at(state_dir), state["ports"]), state["ports"], up_s
    finally:
        st.down(state_dir, log=lambda line: None)


@contextmanager
def environ(env: dict[str, str]):
    """`env` over os.environ for the duration (the S3 keys and endpoint of a stack for this process)."""
    saved = dict(os.environ)
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def smoke_sweep(env: dict[str, str]) -> float:
    """Seconds from submitting the chart's smoke RayJob entrypoint to SUCCEEDED."""
    from tests.integration.local_cluster import chart_rayjob_entrypoint, submit_and_wait

    experiment = f"bench-smoke-{uuid.uuid4().hex[:6]}"
    entrypoint = chart_rayjob_entrypoint("smoke", "cluster/configs/sweeps/smoke.yaml",
                                         ["--set", f"tracking.experiment={experiment}",
                                          "--set", "tracking.log_model=false"])
    return submit_and_wait(env, entrypoint)


def prepared_data(env: dict[str, str], data: str, tmp: Path) -> dict:
    """Cold prepare (publishing), fetch from the stack's S3 into an empty cache, local hit: seconds each."""
    from trainers.config import DataConfig, load_config
    from trainers.data.prepare import prepare

    shared = f"{env['EDP_CHECKPOINT_URI']}/prepared-bench-{uuid.uuid4().hex[:6]}"
    times = {}
    with environ({k: v for k, v in env.items() if k.startswith("AWS_")}):
        for what, cache, publish in (("cold_s", "a", True), ("fetch_s", "b", False), ("hit_s", "b", False)):
            cfg = load_config(DataConfig, source=data, n_process=2, cache_dir=str(tmp / cache), shared_cache=shared,
                              s3_endpoint_url=env["AWS_ENDPOINT_URL"])
            t0 = time.perf_counter()
            prepared = prepare(cfg, publish=publish)
            times[what] = time.perf_counter() - t0
    entry = sum(f.stat().st_size for f in prepared.path.rglob("*") if f.is_file())
    return {**times, "entry_mb": entry / 2**20}


def serve_node_kill(state_dir: Path, env: dict[str, str], ports: dict[str, int], tmp: Path) -> dict:
    from tests.integration.local_cluster import deploy_on_workers, serve_through_node_kill
    from tests.integration.registry_models import register_champion, train_tiny
    from trainers.config import DataConfig, load_config
    from trainers.data.prepare import prepare

    sample = prepare(load_config(DataConfig, source="sample", cache_dir=str(tmp / "sample-cache")))
    checkpoint, _ = train_tiny(sample, tmp / "tiny-escm")
    model = f"bench-kill-{uuid.uuid4().hex[:6]}"
    register_champion(env["MLFLOW_TRACKING_URI"], checkpoint, model, 0.5, model)
    base = deploy_on_workers(env, ports, "escm", model, replicas=2)
    r = serve_through_node_kill(state_dir, base, "worker-2")
    return {"requests": r.requests, "failed": r.failed, "recovery_s": r.recovery_s, "rate": r.rate,
            "failures": r.failures[:3]}


def run(data: str = "sample") -> dict:
    load = [os.getloadavg()[0]]
    result: dict = {"data": data}
    with tempfile.TemporaryDirectory(prefix="edp-bench-cluster-") as d:
        tmp = Path(d)
        for workers in (0, 2):
            with stack_running(tmp / f"stack-{workers}", workers) as (env, ports, up_s):
                result[workers] = {"up_s": up_s, "smoke_s": smoke_sweep(env)}
                if workers:
                    result["prepared"] = prepared_data(env, data, tmp / "prepared")
                    result["kill"] = serve_node_kill(tmp / f"stack-{workers}", env, ports, tmp)
    load.append(os.getloadavg()[0])
    return {**result, "load": load}


def as_markdown(r: dict) -> str:
    single, multi, prep, kill = r[0], r[2], r["prepared"], r["kill"]
    rows = [
        "| what | single node (2-CPU head) | 1 head (0 CPU) + 2 workers (1 CPU each) |",
        "|---|---|---|",
        f"| `edp stack up` | {single['up_s']:.1f} s | {multi['up_s']:.1f} s |",
        f"| the chart's smoke RayJob entrypoint, submitted to SUCCEEDED | {single['smoke_s']:.1f} s | "
        f"{multi['smoke_s']:.1f} s |",
    ]
    failed = f"{kill['failed']} of {kill['requests']:,} requests failed ({kill['failed'] / kill['requests']:.2%})"
    lines = [
        *rows, "",
        f"Prepared data ({r['data']}, {prep['entry_mb']:.1f} MB entry): cold prepare {prep['cold_s']:.2f} s, "
        f"fetch of the published entry {prep['fetch_s']:.2f} s ({prep['cold_s'] / prep['fetch_s']:.0f}x faster), "
        f"local hit {prep['hit_s']:.3f} s.", "",
        f"Serve node kill: {failed} at {kill['rate']:.1f} requests/s; serving again **{kill['recovery_s']:.1f} s** "
        "after the kill" + (f" (first failures: {kill['failures']})" if kill["failures"] else "") + ".", "",
        f"Load average {r['load'][0]:.1f} at the start, {r['load'][1]:.1f} at the end.",
    ]
    return "\n".join(lines)
