"""Pool-process memory settings made in the worker's parent before the fork."""

import logging
import platform
import resource
import threading
from pathlib import Path

import numpy as np
import pytest

from worker.preload import (
    HUGE_PAGES_TUNABLE,
    ReturnMemoryWhenIdle,
    return_free_memory,
    set_large_block_thresholds,
    worker_environment,
)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_glibc_takes_the_fixed_thresholds() -> None:
    assert set_large_block_thresholds() is True


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_a_study_s_freed_arrays_stay_in_the_heap_until_memory_is_returned() -> None:
    assert set_large_block_thresholds() is True

    def faults_of_one_study() -> int:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        arrays = [np.ones(4 << 20, dtype=np.float32) for _ in range(2)]  # 2 × 16 MiB: heap blocks, then freed
        del arrays
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    faults_of_one_study()
    kept = faults_of_one_study()  # the freed 32 MiB (over the former 24 MiB trim threshold) were kept
    return_free_memory()
    returned = faults_of_one_study()  # given back: every page faults in again
    assert kept * 4 < returned


def test_returning_free_memory_works_here_or_off_glibc() -> None:
    assert return_free_memory() is None


class Releases:
    """Counts the returns of free memory a ReturnMemoryWhenIdle asks for."""

    def __init__(self) -> None:
        self.count = 0
        self.done = threading.Event()

    def __call__(self) -> None:
        self.count += 1
        self.done.set()


def test_with_no_idle_time_memory_is_returned_after_each_task() -> None:
    releases = Releases()
    idle = ReturnMemoryWhenIdle(0, releases)
    idle.task_started(sender=None)
    idle.task_finished(sender=None)
    assert releases.count == 1  # at once, in the task's own thread


def test_memory_is_returned_once_the_process_stays_idle() -> None:
    releases = Releases()
    idle = ReturnMemoryWhenIdle(0.05, releases)
    idle.task_finished(sender=None)
    assert releases.done.wait(10)
    assert releases.count == 1


def test_a_task_that_starts_within_the_idle_time_keeps_the_heap() -> None:
    releases = Releases()
    idle = ReturnMemoryWhenIdle(60, releases)
    idle.task_finished(sender=None)
    pending = idle._pending
    assert pending is not None and releases.count == 0
    idle.task_started(sender=None)
    pending.join(10)  # a cancelled timer ends without calling
    assert not pending.is_alive() and releases.count == 0


def test_only_the_last_task_s_timer_stays_pending() -> None:
    releases = Releases()
    idle = ReturnMemoryWhenIdle(60, releases)
    idle.task_finished(sender=None)
    first = idle._pending
    idle.task_finished(sender=None)
    assert first is not None and first is not idle._pending
    first.join(10)
    assert not first.is_alive() and releases.count == 0
    idle.task_started(sender=None)


def test_the_worker_environment_asks_for_huge_pages_unless_tunables_are_set() -> None:
    assert worker_environment({"PATH": "/bin"}) == {"PATH": "/bin", "GLIBC_TUNABLES": HUGE_PAGES_TUNABLE}
    assert worker_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=1"})["GLIBC_TUNABLES"] == (
        "glibc.malloc.arena_max=1"
    )  # a site's own tunables win


def test_the_docker_image_runs_with_the_same_tunable() -> None:
    dockerfile = (Path(__file__).resolve().parents[2] / "Dockerfile").read_text()
    assert f"GLIBC_TUNABLES={HUGE_PAGES_TUNABLE}" in dockerfile


def test_a_failing_warm_up_is_logged_and_does_not_stop_the_worker(monkeypatch, caplog) -> None:
    from worker import preload

    def broken(*_: object) -> None:
        raise OSError("no room for the warm-up study")

    monkeypatch.setattr(preload, "warm_up", broken)
    with caplog.at_level(logging.ERROR, logger="lungvision.worker"):
        preload.warm_up_or_log(object(), object())  # type: ignore[arg-type]
    assert "the warm-up study failed (OSError: no room for the warm-up study)" in caplog.text
