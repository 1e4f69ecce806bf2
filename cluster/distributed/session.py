"""What a training worker needs of Ray: report metrics (with a checkpoint), the checkpoint to resume from, its
rank. `ddp.worker_loop` takes a `WorkerSession`; `TrainSession` adapts Ray Train (a DDP worker), `TuneSession`
Ray Tune (a single-worker trial, which trains in the trial process).

    worker_loop(config, TrainSession())   # in a TorchTrainer worker
    worker_loop(config, TuneSession())    # in a Tune function trainable
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from types import ModuleType
from typing import Protocol


class WorkerSession(Protocol):
    rank: int
    world_size: int

    def report(self, metrics: dict, checkpoint_dir: Path | None = None) -> None:
        """Report `metrics`, with the directory `checkpoint_dir` persisted as this step's checkpoint."""

    def resume_dir(self) -> AbstractContextManager[Path | None]:
        """The directory of the checkpoint to resume from (None: start afresh), while the context is open."""


class _RaySession:
    """Ray Train and Ray Tune share the calls a worker makes (`report`, `get_checkpoint`, `Checkpoint`)."""

    def __init__(self, api: ModuleType, rank: int, world_size: int):
        self.api, self.rank, self.world_size = api, rank, world_size

    def report(self, metrics: dict, checkpoint_dir: Path | None = None) -> None:
        if checkpoint_dir is None:
            self.api.report(metrics)
        else:
            self.api.report(metrics, checkpoint=self.api.Checkpoint.from_directory(str(checkpoint_dir)))

    @contextmanager
    def resume_dir(self) -> Iterator[Path | None]:
        checkpoint = self.api.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as d:
            yield Path(d)


class TrainSession(_RaySession):
    """A Ray Train worker of a TorchTrainer: its world rank and size from `ray.train.get_context()`."""

    def __init__(self):
        import ray.train  # Ray only inside a worker

        ctx = ray.train.get_context()
        super().__init__(ray.train, ctx.get_world_rank(), ctx.get_world_size())


class TuneSession(_RaySession):
    """A Ray Tune trial that trains in its own process: rank 0 of 1."""

    def __init__(self):
        import ray.tune  # Ray only inside a trial

        super().__init__(ray.tune, 0, 1)
