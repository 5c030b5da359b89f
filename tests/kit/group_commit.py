"""A group commit shown with one fsync held up on purpose: a second writer finishes while the first one's fsync
waits, and the first does not return before its fsync."""

import os
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
HOLD_S = 10.0  # the longest a held fsync, or a writer, is waited for
SECOND_WRITER_S = 5.0  # how long the second writer may take while the first one's fsync is held


def second_writer_is_not_held_up(
    monkeypatch,
    first: Callable[[], object],
    second: Callable[[], object],
    *,
    seen: Callable[[int], T],
    counts: Callable[[int], bool] = lambda _descriptor: True,
) -> list[T]:
    """Run ``first`` on a thread until its first fsync of a descriptor that ``counts``, hold that fsync, run
    ``second`` on another thread and assert that it finishes meanwhile and that ``first`` has not returned;
    then release the fsync. Returns ``seen(descriptor)`` of every fsync that counted, in order, taken as it
    began (e.g. what the file or folder held then)."""
    in_fsync, release = threading.Event(), threading.Event()
    seen_at_fsync: list[T] = []
    real_fsync = os.fsync

    def fsync(descriptor: int) -> None:
        if counts(descriptor):
            seen_at_fsync.append(seen(descriptor))
            if len(seen_at_fsync) == 1:
                in_fsync.set()
                release.wait(HOLD_S)
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", fsync)
    first_writer, second_writer = threading.Thread(target=first), threading.Thread(target=second)
    first_writer.start()
    try:
        assert in_fsync.wait(HOLD_S), "the first writer never reached its fsync"
        second_writer.start()
        second_writer.join(SECOND_WRITER_S)
        assert not second_writer.is_alive(), "the second writer waited for the first one's fsync"
        assert first_writer.is_alive(), "the first writer returned before its fsync"
    finally:
        release.set()
        first_writer.join(HOLD_S)
        second_writer.join(HOLD_S)
    return seen_at_fsync
