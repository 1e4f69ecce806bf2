"""Ray Train (real local Ray, gloo DDP on CPU) + a real MLflow server: 2-worker run and a killed worker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from cluster.distributed.ddp import RayTrainConfig, run_train
from cluster.tracking.runs import RUN_ID_FILE, client
from tests.integration.ray_failures import MARKER

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


def _config(tmp_path, prepared_sample, mlflow_server, **extra) -> RayTrainConfig:
    return RayTrainConfig.model_validate({
        "name": f"ddp-{uuid.uuid4().hex[:6]}", "storage_path": str(tmp_path / "ray"),
        "train": {"model": "escm", "model_overrides": {"flavour": "tiny"}, "device": "cpu", "max_steps": 8,
                  "eval_every": 4, "log_every": 1, "warmup": 20, "lr_factor": 2.0, "batch_size": 8,
                  "eval_generate": 4, "num_samples": 4, "out_dir": str(tmp_path / "out"),
                  "data": {"source": "sample", "cache_dir": str(prepared_sample.path.parent)}},
        "scaling": {"workers": 2, "cpus_per_worker": 0.9},
        "tracking": {"uri": mlflow_server, "experiment": f"ray-train-{uuid.uuid4().hex[:6]}"}, **extra})


def test_two_worker_ddp_reports_checkpoints_and_logs(ray_local, mlflow_server, prepared_sample, tmp_path):
    t0 = time.perf_counter()
    result = run_train(_config(tmp_path, prepared_sample, mlflow_server))
    print(f"\n2-worker TorchTrainer (gloo, tiny ESCM, 8 steps): {time.perf_counter() - t0:.1f} s wall")
    m = result["metrics"]
    assert m["step"] == 8 and m["world_size"] == 2 and m["resumed_from_step"] == 0
    ckpt = Path(result["checkpoint"])
    assert (ckpt / "checkpoint.pt").exists() and (ckpt / RUN_ID_FILE).read_text() == result["run_id"]

    c = client(mlflow_server)
    run = c.get_run(result["run_id"])
    assert run.info.status == "FINISHED" and run.data.params["world_size"] == "2"
    assert [x.step for x in c.get_metric_history(run.info.run_id, "valid_ppl")] == [4, 8]
    history = sorted(c.get_metric_history(run.info.run_id, "train_loss"), key=lambda x: x.step)
    losses = [x.value for x in history]
    assert len(losses) == 8 and losses[-1] < losses[0]  # the loss falls
    assert {"config.yaml", "vocab.json", "samples.jsonl", "plots"} <= {
        a.path for a in c.list_artifacts(run.info.run_id)}  # the weights: in the logged model's serving bundle

    # the logged model loads in a fresh process and answers a request
    request = "[{'context': ['I got a new puppy!']}]"
    code = (f"import json, mlflow; m = mlflow.pyfunc.load_model('runs:/{result['run_id']}/model'); "
            f"print(json.dumps(m.predict({request})))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180,
                          env={**os.environ, "MLFLOW_TRACKING_URI": mlflow_server, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    answer = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(answer[0]) == {"response", "emotion", "emotion_top", "evidence", "screened", "screen"}


@pytest.mark.parametrize("eval_from", [0, 8], ids=["evaluated-checkpoint", "resume-checkpoint"])
def test_killed_worker_resumes_from_checkpoint_in_the_same_run(ray_local, mlflow_server, prepared_sample,
                                                                worker_fails_once, tmp_path, eval_from):
    """eval_from 8: the step-4 checkpoint is a resume checkpoint without evaluation (the paper recipe's first
    10,400/11,200 steps), reported to Ray all the same."""
    cfg = _config(tmp_path, prepared_sample, mlflow_server, max_failures=1)
    cfg.train.eval_from = eval_from
    cfg.tracking.log_model = False
    result = run_train(cfg)
    m = result["metrics"]
    assert m["step"] == 8  # the same final step count as an uninterrupted run
    assert m["resumed_from_step"] == 4  # resumed from the step-4 checkpoint, not from 0
    assert (tmp_path / "out" / MARKER).read_text() == str(worker_fails_once) == "6"

    c = client(mlflow_server)
    runs = c.search_runs([c.get_experiment_by_name(cfg.tracking.experiment).experiment_id])
    assert [r.info.run_id for r in runs] == [result["run_id"]]  # the retry continued the same MLflow run
    run = runs[0]
    assert run.data.tags["resumed_from_step"] == "4" and run.info.status == "FINISHED"
    evaluated = [4, 8] if eval_from == 0 else [8]
    assert sorted({x.step for x in c.get_metric_history(run.info.run_id, "valid_ppl")}) == evaluated
    assert "final_valid_ppl" in run.data.metrics
