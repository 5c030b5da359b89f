"""Fixtures for the DICOM node tests (helpers live in tests/kit/node.py; ``spool`` in tests/conftest.py)."""

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from common.spool import Spool
from dicom_node.application_entity import ANALYSED_SOP_CLASSES
from dicom_node.completion import StudyCompletionTracker
from dicom_node.intake import Intake
from tests.kit.node import TEST_REDIS_DB, NodeProcess, QueueReader, node_settings


@pytest.fixture(scope="session")
def redis_queue() -> QueueReader:
    client = redis.Redis(host="127.0.0.1", port=6379, db=TEST_REDIS_DB, socket_timeout=5)
    try:
        client.ping()
    except redis.exceptions.ConnectionError:
        pytest.skip("no Redis on 127.0.0.1:6379")
    client.flushdb()
    return QueueReader(client)


@pytest.fixture
def node_factory(tmp_path: Path, redis_queue: QueueReader) -> Iterator[Callable[..., NodeProcess]]:
    """Start nodes with test defaults (loopback, free port, temp spool, Redis db 15) plus ``overrides``."""
    started: list[NodeProcess] = []

    def start(folder: Path | None = None, **overrides: dict) -> NodeProcess:
        node = NodeProcess(folder or tmp_path, node_settings(folder or tmp_path, **overrides))
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
