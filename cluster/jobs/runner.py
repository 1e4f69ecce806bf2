"""`run_job`: how every `python -m cluster.jobs.<name>` entrypoint validates, runs and closes."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TypeVar

from trainers.config import ConfigError
from trainers.data.records import DataError

T = TypeVar("T")


def run_job(build: Callable[[], T], run: Callable[[T], int]) -> int:
    """Parse/validate with `build` (before Ray starts), then `run` on Ray; bad input exits 2 with a message,
    and Ray is shut down on every path."""
    try:
        cfg = build()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import ray  # Ray only after the input is validated

    try:
        return run(cfg)
    except (ConfigError, DataError) as e:  # ConfigError here: e.g. trials that fit no node of the cluster
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        ray.shutdown()
