"""Waiting for something to happen, bounded: the one polling loop of the tests."""

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(
    condition: Callable[[], T],
    timeout_s: float,
    interval_s: float = 0.2,
    message: str | Callable[[], str] = "the condition",
) -> T:
    """Call ``condition`` every ``interval_s`` until it returns something true, and return that.

    After ``timeout_s`` without, raise AssertionError naming ``message`` (what was waited for; a callable
    is asked only then, e.g. for a log tail). An exception of ``condition`` ends the wait at once.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            what = message() if callable(message) else message
            raise AssertionError(f"not within {timeout_s:g} s: {what}")
        time.sleep(interval_s)
