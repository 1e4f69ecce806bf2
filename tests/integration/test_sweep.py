"""The smoke sweep on real local Ray + a real MLflow server: parent run, nested children, ablation table."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest

from cluster.distributed.tuning import load_sweep, run_sweep
from cluster.tracking.runs import client

pytestmark = [pytest.mark.integration, pytest.mark.slow]
SMOKE = Path(__file__).resolve().parents[2] / "cluster" / "configs" / "sweeps" / "smoke.yaml"


def test_smoke_sweep_nests_children_and_logs_the_table(ray_local, mlflow_server, prepared_sample, tmp_path):
    experiment = f"smoke-{uuid.uuid4().hex[:6]}"
    cfg = load_sweep(SMOKE, [f"base.data.cache_dir={prepared_sample.path.parent}",
                             f"storage_path={tmp_path}/ray", f"work_dir={tmp_path}/work",
                             f"tracking.uri={mlflow_server}", f"tracking.experiment={experiment}"])
    t0 = time.perf_counter()
    summary = run_sweep(cfg)
    print(f"\nsmoke sweep (3 trials, tiny, 6 steps): {time.perf_counter() - t0:.1f} s wall")
    assert summary["errors"] == [] and summary["trials"] == 3

    c = client(mlflow_server)
    exp = c.get_experiment_by_name(experiment)
    runs = c.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert [p.info.run_id for p in parents] == [summary["parent_run_id"]]
    parent = parents[0]
    assert len(children) == 3
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent.info.run_id}
    assert {r.data.tags["variant"] for r in children} == {"transformer", "escm", "escm-no_vr"}
    assert all(r.info.status == "FINISHED" and "final_valid_ppl" in r.data.metrics for r in children)

    best = parent.data.tags["best_child_run_id"]
    ppl = {r.info.run_id: r.data.metrics["final_valid_ppl"] for r in children}
    assert best == min(ppl, key=ppl.get)
    assert c.get_run(best).data.tags["best_in_sweep"] == "true"
    assert {"ablation_table.csv", "ablation_table.md", "sweep.yaml"} <= {
        a.path for a in c.list_artifacts(parent.info.run_id)}
    table = c.download_artifacts(parent.info.run_id, "ablation_table.md", str(tmp_path))
    text = Path(table).read_text()
    assert "| Model | Acc | PPL | PPL_token | Dist-1 | Dist-2 |" in text and "| escm (n=1) |" in text


def test_a_resubmitted_sweep_resumes_its_experiment_and_parent_run(mlflow_server, prepared_sample, tmp_path):
    """The job's driver is SIGKILLed (with its Ray) after the first trial finished; the same command again (a RayJob
    retry) restores the Tune experiment from storage under the same MLflow parent, and no finished trial re-runs."""
    import contextlib
    import os
    import signal
    import subprocess
    import sys

    import psutil

    experiment = f"resume-{uuid.uuid4().hex[:6]}"
    cmd = [sys.executable, "-m", "cluster.jobs.sweep", "--config", str(SMOKE),
           "--set", f"base.data.cache_dir={prepared_sample.path.parent}", "--set", f"storage_path={tmp_path}/ray",
           "--set", f"work_dir={tmp_path}/work", "--set", f"tracking.uri={mlflow_server}",
           "--set", f"tracking.experiment={experiment}", "--set", "tracking.log_model=false",
           "--set", "base.max_steps=40", "--set", "base.eval_every=10", "--set", "max_concurrent_trials=1",
           "--set", "base.eval_from=30"]  # steps 10 and 20 report resume checkpoints without the metric
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(SMOKE.parents[3])
    c = client(mlflow_server)

    def search(nested: bool) -> list:
        exp = c.get_experiment_by_name(experiment)
        found = c.search_runs([exp.experiment_id]) if exp else []
        return [r for r in found if ("mlflow.parentRunId" in r.data.tags) == nested]

    def children() -> list:
        return search(nested=True)

    def table_so_far() -> str | None:  # the parent's table, which each finished trial rewrites
        parents = search(nested=False)
        if not parents or "ablation_table.md" not in {a.path for a in c.list_artifacts(parents[0].info.run_id)}:
            return None
        return Path(c.download_artifacts(parents[0].info.run_id, "ablation_table.md", str(tmp_path))).read_text()

    first = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while (table := table_so_far()) is None:
            assert first.poll() is None and time.monotonic() < deadline, "no trial finished before the kill"
            time.sleep(1)
    finally:  # the driver and the whole Ray it started (some of Ray's processes start sessions of their own)
        driver = psutil.Process(first.pid)
        doomed = [driver, *driver.children(recursive=True)]
        os.killpg(first.pid, signal.SIGKILL)
        for p in doomed:
            with contextlib.suppress(psutil.Error):
                p.kill()
        psutil.wait_procs(doomed, timeout=30)
        first.wait()
    done_before = {r.info.run_id: r.info.end_time for r in children() if r.info.status == "FINISHED"}
    assert len(done_before) < 3, "every trial finished before the kill: nothing left to resume"
    # the killed sweep's parent already holds the table of what finished, and only of that
    assert table.startswith(f"So far: the {len(done_before)} trial(s) finished")
    finished = {c.get_run(run_id).data.tags["variant"] for run_id in done_before}
    for variant in ("transformer", "escm", "escm-no_vr"):
        assert (f"| {variant} (n=1) |" in table) == (variant in finished), (variant, table)

    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming the Tune experiment" in second.stdout
    runs = children()
    assert len({r.data.tags["mlflow.parentRunId"] for r in runs}) == 1  # one parent, kept across the retry
    assert sorted(r.data.tags["variant"] for r in runs) == ["escm", "escm-no_vr", "transformer"]  # none twice
    for run_id, end_time in done_before.items():  # finished trials were not run again
        assert c.get_run(run_id).info.end_time == end_time
    assert all(r.info.status == "FINISHED" for r in runs)
    parents = search(nested=False)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    table = table_so_far()  # the sweep's end rewrote it with every trial
    assert not table.startswith("So far")
    assert all(f"| {v} (n=1) |" in table for v in ("transformer", "escm", "escm-no_vr"))
