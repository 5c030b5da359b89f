"""Pool-process memory settings made in the worker's parent before the fork."""

import platform
from pathlib import Path

import pytest

from worker.preload import HUGE_PAGES_TUNABLE, release_large_blocks, worker_environment


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_glibc_takes_the_fixed_thresholds() -> None:
    assert release_large_blocks() is True


def test_the_worker_environment_asks_for_huge_pages_unless_tunables_are_set() -> None:
    assert worker_environment({"PATH": "/bin"}) == {"PATH": "/bin", "GLIBC_TUNABLES": HUGE_PAGES_TUNABLE}
    assert worker_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=1"})["GLIBC_TUNABLES"] == (
        "glibc.malloc.arena_max=1"
    )  # a site's own tunables win


def test_the_docker_image_runs_with_the_same_tunable() -> None:
    dockerfile = (Path(__file__).resolve().parents[2] / "Dockerfile").read_text()
    assert f"GLIBC_TUNABLES={HUGE_PAGES_TUNABLE}" in dockerfile
