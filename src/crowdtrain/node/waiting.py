"""Waiting for the server the same way everywhere: jittered exponential backoff, and sleeps
that end as soon as the node is asked to stop."""

from __future__ import annotations

import random
import time
from collections.abc import Callable

FIRST_RETRY_S = 0.5


class Stopped(Exception):
    """The node was asked to stop while it waited for the server."""


def backoff_s(attempt: int, cap: float, first: float = FIRST_RETRY_S) -> float:
    """The wait before retry number `attempt` (0 first): doubling from `first` up to `cap`,
    jittered so that the nodes of a restarted server do not all come back at the same instant."""
    return min(cap, first * 2 ** min(attempt, 16)) * random.uniform(0.5, 1.0)


def sleep_unless_stopped(seconds: float, should_stop: Callable[[], bool]) -> None:
    """Sleep `seconds`, or raise Stopped as soon as `should_stop()` is true."""
    end = time.monotonic() + seconds
    while True:
        if should_stop():
            raise Stopped()
        left = end - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(0.1, left))
