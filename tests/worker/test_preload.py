"""Pool-process memory settings made in the worker's parent before the fork."""

import logging
import platform
from pathlib import Path

import pytest

from worker.preload import HUGE_PAGES_TUNABLE, return_free_memory, set_large_block_thresholds, worker_environment


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_glibc_takes_the_fixed_thresholds() -> None:
    assert set_large_block_thresholds() is True


def test_returning_free_memory_works_as_a_celery_signal_handler() -> None:
    assert return_free_memory(sender=None, signal=None) is None  # task_postrun's keywords; no error here or off glibc


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
