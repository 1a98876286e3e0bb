"""Small helpers shared by tests of several packages."""

from __future__ import annotations

import time
from collections.abc import Callable

import redis


def delete_prefix(client: redis.Redis, prefix: str) -> None:
    """Deletes every key under `prefix`."""
    keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
    for start in range(0, len(keys), 500):
        client.unlink(*keys[start : start + 500])


def wait_for(
    condition: Callable[[], bool], timeout_s: float, what: str, interval_s: float = 0.05
) -> None:
    """Polls `condition` until it holds (wait-for-condition); fails after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)
