"""Counting how often an association's threads wake up (common/association_io.py): polling would be ≈ 1 000/s."""

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from common.association_io import ReactorGate, WholePduSocket


@contextmanager
def counted_wakeups(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, int]]:
    """Count, per thread kind, the wake-ups of every association while the block runs: "dul" (its socket's
    ``ready``) and "reactor" (its gate's ``wait``)."""
    wakeups = {"dul": 0, "reactor": 0}
    ready, wait = WholePduSocket.ready.fget, ReactorGate.wait

    def counted_ready(self) -> bool:
        wakeups["dul"] += 1
        return ready(self)

    def counted_wait(self, timeout=None) -> bool:
        wakeups["reactor"] += 1
        return wait(self, timeout)

    monkeypatch.setattr(WholePduSocket, "ready", property(counted_ready))
    monkeypatch.setattr(ReactorGate, "wait", counted_wait)
    yield wakeups


def wakeups_while_idle(wakeups: dict[str, int], seconds: float = 0.5) -> dict[str, int]:
    """How many wake-ups happen in ``seconds`` of doing nothing (a bounded wait, not a timing assertion)."""
    before = dict(wakeups)
    threading.Event().wait(seconds)
    return {name: wakeups[name] - before[name] for name in wakeups}
