"""Pool-process memory settings made in the worker's parent before the fork."""

import platform

import pytest

from worker.preload import release_large_blocks


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_glibc_takes_the_fixed_thresholds() -> None:
    assert release_large_blocks() is True
