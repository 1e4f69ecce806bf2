"""The multi-node local stack (`edp stack up --workers N`) at work, shared by tests/integration/test_multinode.py and
tests/bench/bench_cluster.py: the chart's RayJob entrypoints submitted as KubeRay's submitter does, a worker node's
raylet SIGKILLed, and Ray Serve under steady HTTP load across such a kill (how many requests failed, how soon the
endpoint served again). `stack_env` (a shell's environment after `source .edp/stack/env`) serves test_stack.py too."""

from __future__ import annotations

import os
import shlex
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from cluster.local import processes as ps
from cluster.local import services as ls
from cluster.local import stack as st
from cluster.polling import poll_until

ROOT = Path(__file__).resolve().parents[2]
BODY = {"context": ["My sister is visiting this weekend and I can't wait to see her."]}


def stack_env(state_dir: Path) -> dict[str, str]:
    """The environment of a shell that ran `source <state_dir>/env`."""
    lines = (state_dir / "env").read_text().splitlines()
    exported = dict(line.removeprefix("export ").split("=", 1) for line in lines if line.startswith("export "))
    return {**{k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_", "MLFLOW_"))},
            **{k: shlex.split(v)[0] for k, v in exported.items()}, "PYTHONPATH": str(ROOT)}


def chart_rayjob_entrypoint(name: str, config: str, args: list[str]) -> str:
    """The entrypoint the chart renders for a RayJob of sweep `config` (values sweeps.jobs), with this checkout as
    `sweeps.workdir` in place of the image's /home/ray/app (one command, no `cd`: what KubeRay submits whole)."""
    import sys

    import pytest

    helm = pytest.importorskip("helm_python", reason="helm-python-sdk (dev extra) renders the chart")
    sys.path.insert(0, str(ROOT / "tests" / "helm"))
    from chart_render import CHART_DIR, of_kind, render_docs

    chart = helm.Chart.load(CHART_DIR)
    try:
        (job,) = of_kind(render_docs(chart, {"sweeps": {"workdir": str(ROOT),
                                                         "jobs": [{"name": name, "config": config, "args": args}]}}),
                         "RayJob")
    finally:
        chart.close()
    return job["spec"]["entrypoint"]


def submit_and_wait(env: dict[str, str], entrypoint: str, timeout: float = 900) -> float:
    """What KubeRay's submitter does: the entrypoint string to the stack's job server (which runs it in a shell);
    seconds from submission to SUCCEEDED (AssertionError with the job's log otherwise)."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    jobs = JobSubmissionClient(env["RAY_API_SERVER_ADDRESS"])
    t0 = time.monotonic()
    job_id = jobs.submit_job(entrypoint=entrypoint)
    assert poll_until(lambda: jobs.get_job_status(job_id).is_terminal(), timeout, 2), f"{job_id} still running"
    wall_s = time.monotonic() - t0
    assert jobs.get_job_status(job_id) == JobStatus.SUCCEEDED, jobs.get_job_logs(job_id)[-4000:]
    return wall_s


def worker_node_ids(state_dir: Path) -> dict[str, str]:
    """{worker name: Ray node id} of the stack's worker nodes."""
    return {name: rec["url"].removeprefix("node:") for name, rec in st.Stack.at(state_dir).load()["nodes"].items()}


def restore_workers(state_dir: Path, workers: int) -> dict[str, str]:
    """`edp stack up` again: restarts the worker nodes a test killed; returns worker_node_ids once all are ALIVE."""
    st.up(state_dir, workers=workers, log=lambda line: None)
    ports = st.Stack.at(state_dir).load()["ports"]
    ids = worker_node_ids(state_dir)
    alive = poll_until(lambda: set(ids.values()) <= set(ls.ray_nodes(st.urls(ports)["ray"])), 60, 1)
    assert alive, f"worker nodes {ids} not all ALIVE after `stack up`"
    return ids


def kill_raylet(state_dir: Path, worker: str) -> float:
    """SIGKILL the raylet of worker node `worker` (no clean-up, as when a machine dies); the monotonic kill time."""
    import psutil

    record = st.Stack.at(state_dir).load()["nodes"][worker]
    raylets = [p for p in ps.process_tree(record["pid"], not_before=record["start"]) if p.name() == "raylet"]
    assert raylets, f"no raylet under {worker}"
    t_kill = time.monotonic()
    for p in raylets:
        p.send_signal(9)
    psutil.wait_procs(raylets, timeout=10)
    return t_kill


def replica_nodes(dashboard_url: str, app: str, deployment: str = "Responder") -> list[str]:
    """Node ids of the ALIVE replicas of `app`'s deployment (one entry per replica)."""
    from ray.util.state import list_actors

    actors = list_actors(address=dashboard_url, filters=[("class_name", "=", f"ServeReplica:{app}:{deployment}"),
                                                         ("state", "=", "ALIVE")], raise_on_missing_output=False)
    return [a.node_id for a in actors]


def deploy_on_workers(env: dict[str, str], ports: dict[str, int], app: str, model_name: str, replicas: int) -> str:
    """`serve deploy` of application `app` of the Serve config with `replicas` fixed replicas of 1 CPU (so on
    1-CPU worker nodes, one per node) and the proxy on the head only; its base URL once every replica is ALIVE."""
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    from cluster.local import serve as serve_local

    config = serve_local.deploy_config(
        app, {"model_name": model_name, "mlflow_tracking_uri": env["MLFLOW_TRACKING_URI"]}, ports["serve_http"],
        deployment={"num_replicas": replicas, "autoscaling_config": None, "ray_actor_options": {"num_cpus": 1}},
        proxy_location="HeadOnly")
    ServeSubmissionClient(env["RAY_DASHBOARD_ADDRESS"]).deploy_applications(config)
    base = f"http://127.0.0.1:{ports['serve_http']}{config['applications'][0]['route_prefix']}"
    dashboard = env["RAY_DASHBOARD_ADDRESS"]
    assert poll_until(lambda: len(replica_nodes(dashboard, app)) == replicas and ps.http_ok(f"{base}/healthz"),
                      240, 1), f"{app}: {replicas} replicas not serving within 240 s"
    return base


@dataclass
class KillUnderLoad:
    """Requests sent by the load generator around one node kill (times in seconds from the kill)."""
    requests: int                  # all requests that finished
    failed: int                    # non-200 answers and transport errors
    after_kill: int                # requests started after the kill
    recovery_s: float              # kill -> end of the first success that started after the last failure
    rate: float                    # finished requests per second over the whole run
    failures: list[tuple[float, str]]  # (start time, what) of each failure

    @property
    def failed_fraction(self) -> float:
        return self.failed / max(self.requests, 1)


def serve_through_node_kill(state_dir: Path, base: str, victim: str, clients: int = 4, before_s: float = 10,
                            after_s: float = 35, timeout_s: float = 30) -> KillUnderLoad:
    """`clients` closed-loop HTTP clients POST /v1/respond to `base` without pause; after `before_s` s the raylet
    of worker node `victim` is SIGKILLed; the load runs `after_s` s more."""
    import httpx

    log: list[tuple[float, float, str | None]] = []   # (start, end, None or what failed)
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(base_url=base, timeout=timeout_s) as c:
            while not stop.is_set():
                t0 = time.monotonic()
                try:
                    r = c.post("/v1/respond", json=BODY)
                    what = None if r.status_code == 200 else f"HTTP {r.status_code}: {r.text[:200]}"
                except httpx.HTTPError as e:
                    what = f"{type(e).__name__}: {e}"
                log.append((t0, time.monotonic(), what))

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    t_start = time.monotonic()
    for t in threads:
        t.start()
    time.sleep(before_s)
    t_kill = kill_raylet(state_dir, victim)
    time.sleep(after_s)
    stop.set()
    for t in threads:
        t.join(timeout_s + 5)
    t_end = time.monotonic()
    return summarize(log, t_kill, t_end - t_start)


def summarize(log: list[tuple[float, float, str | None]], t_kill: float, wall_s: float) -> KillUnderLoad:
    """The figures of a load log of (start, end, failure or None) around a kill at `t_kill`."""
    failures = [(start, what) for start, _end, what in log if what]
    last_failure_end = max((end for _start, end, what in log if what), default=t_kill)
    recovered = min((end for start, end, what in log if not what and start >= max(last_failure_end, t_kill)),
                    default=float("inf"))
    return KillUnderLoad(len(log), len(failures), sum(start >= t_kill for start, _e, _w in log),
                         recovered - t_kill, len(log) / wall_s, [(s - t_kill, w) for s, w in failures])
