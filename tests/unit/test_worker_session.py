"""`worker_loop` reports and resumes through a `WorkerSession`: a plain-Python session stands in for Ray Train/Tune."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import pytest

from cluster.distributed.ddp import worker_loop
from trainers.config import TrainConfig, load_config

pytestmark = pytest.mark.usefixtures("one_thread")


class RecordingSession:
    """A `WorkerSession` that keeps what is reported (a copy of each checkpoint directory's file names)."""

    rank, world_size = 0, 1

    def __init__(self, resume_from: Path | None = None):
        self.reports: list[tuple[dict, list[str] | None]] = []
        self.resume_from = resume_from

    def report(self, metrics: dict, checkpoint_dir: Path | None = None) -> None:
        self.reports.append((metrics, sorted(p.name for p in checkpoint_dir.iterdir()) if checkpoint_dir else None))

    @contextmanager
    def resume_dir(self):
        yield self.resume_from


def test_worker_loop_reports_checkpoints_and_resumes_through_the_session(tmp_path, prepared_sample):
    cfg = load_config(TrainConfig, model="escm", out_dir=str(tmp_path / "run"), device="cpu", max_steps=4,
                      eval_every=2, eval_generate=2, num_samples=2, batch_size=8,
                      data={"source": "sample", "cache_dir": str(prepared_sample.path.parent)},
                      model_overrides={"flavour": "tiny"})
    session = RecordingSession()
    worker_loop({"train": cfg.model_dump(), "tracking_uri": None}, session)
    evals = [(m, files) for m, files in session.reports if "valid_ppl" in m]
    assert [m["step"] for m, _ in evals] == [2, 4] and all(m["world_size"] == 1 for m, _ in evals)
    assert evals[0][1] == ["best.pt", "checkpoint.pt"]  # no MLflow run: no run id file

    stored = tmp_path / "stored"  # what Ray would hand back: the step checkpoint as checkpoint.pt
    stored.mkdir()
    newest = sorted((tmp_path / "run" / "checkpoints").glob("step_*.pt"))[-1]
    (stored / "checkpoint.pt").write_bytes(newest.read_bytes())
    resumed = RecordingSession(resume_from=stored)
    worker_loop({"train": cfg.model_copy(update={"max_steps": 6}).model_dump(), "tracking_uri": None}, resumed)
    assert resumed.reports[0][0]["resumed_from_step"] == 4
