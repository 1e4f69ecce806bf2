"""The smoke sweep on real local Ray + a real MLflow server: parent run, nested children, ablation table."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest

from cluster.mlflow.runs import client
from cluster.ray.tune import load_sweep, run_sweep

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
    assert "| Model | Acc | PPL | Dist-1 | Dist-2 |" in text and "| escm (n=1) |" in text
