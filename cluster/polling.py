"""One deadline-polling helper: call a check until it answers or the time is up."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def poll_until(check: Callable[[], T], timeout: float, interval: float = 0.5) -> T | None:
    """Call `check` every `interval` s until it returns something truthy (returned) or `timeout` s have
    passed (then None; the check runs at least once, and once more at the deadline). Exceptions propagate."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        time.sleep(min(interval, left))
