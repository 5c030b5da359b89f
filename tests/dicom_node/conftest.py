"""Fixtures for the DICOM node tests (helpers live in tests/kit/node.py; ``spool`` in tests/conftest.py)."""

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from common.spool import Spool
from dicom_node.application_entity import ANALYSED_SOP_CLASSES
from dicom_node.completion import StudyCompletionTracker
from dicom_node.intake import Intake
from tests.kit.node import NodeProcess, QueueReader, node_settings
from tests.kit.redis_server import RedisServer


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory) -> Iterator[RedisServer]:
    """A redis-server of these tests' own (the machine's Redis is never written or flushed)."""
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="session")
def redis_queue(redis_server: RedisServer) -> QueueReader:
    return QueueReader(redis_server.client())


@pytest.fixture
def node_factory(tmp_path: Path, redis_server: RedisServer) -> Iterator[Callable[..., NodeProcess]]:
    """Start nodes with test defaults (loopback, free port, temp spool, the tests' own Redis) plus ``overrides``."""
    started: list[NodeProcess] = []

    def start(folder: Path | None = None, **overrides: dict) -> NodeProcess:
        node = NodeProcess(folder or tmp_path, node_settings(folder or tmp_path, redis_server.url, **overrides))
        started.append(node)
        return node.start()

    yield start
    for node in started:
        node.stop()


@pytest.fixture
def tracker() -> StudyCompletionTracker:
    return StudyCompletionTracker(stable_seconds=5)


@pytest.fixture
def intake(spool: Spool, tracker: StudyCompletionTracker) -> Intake:
    return Intake(spool, tracker, ANALYSED_SOP_CLASSES, monotonic_clock=lambda: 42.0)
