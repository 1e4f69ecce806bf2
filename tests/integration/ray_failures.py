"""A real worker failure for the Ray Train tests: the last rank SIGKILLs itself (no clean-up) once, when it is
about to run step `FAIL_AT_STEP`; a marker file in the run's output directory makes the restarted worker group
pass that step. Installed by the `worker_fails_once` fixture in place of `cluster.distributed.ddp.train_worker`;
workers import this module from the driver's sys.path (Ray passes the working directory on)."""

from __future__ import annotations

import os
import signal
import time

from trainers.loop import Trainer

FAIL_AT_STEP = 6
MARKER = ".failure_injected"


class FailingTrainer(Trainer):
    def train_step(self, batch: dict) -> dict:
        marker = self.out / MARKER
        if self.rank == self.world_size - 1 and self.step + 1 == FAIL_AT_STEP and not marker.exists():
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(str(FAIL_AT_STEP))
            # the controller polls workers' reports; a tiny model reaches this step milliseconds after the
            # last checkpoint, so give it a moment to register that report, as any real failure would
            time.sleep(3)
            os.kill(os.getpid(), signal.SIGKILL)
        return super().train_step(batch)


def failing_train_worker(config: dict) -> None:
    """`train_worker` with `FailingTrainer` in place of `Trainer` (in this worker process only)."""
    from cluster.distributed import ddp as ray_train

    ray_train.Trainer = FailingTrainer
    ray_train.train_worker(config)
