"""Results have their own queue, taken before new analyses — with a real Redis of the test's own and
with the embedded SQLite broker: the worker app's routes and the sweeper's publisher put deliveries
there, and a consumer set up as the worker's (its queues in CONSUMED_QUEUES order, one message at a
time) takes every waiting result before the analyses that were queued earlier."""

from collections.abc import Iterator
from pathlib import Path

import pytest

from common import audit
from common.messages import ANALYSE_STUDY_TASK, DELIVER_TASK, HL7_TASK
from common.publisher import Publisher
from config.settings import load_settings
from worker import celery_app
from worker.queues import ANALYSIS_QUEUE, CONSUMED_QUEUES, DELIVERY_QUEUE

DRAIN_TIMEOUT_S = 10.0


@pytest.fixture(params=["embedded", "redis"])
def broker_url(request, tmp_path) -> Iterator[str]:
    if request.param == "embedded":
        yield f"sqla+sqlite:///{tmp_path}/broker.sqlite"
        return
    from tests.kit.redis_server import RedisServer

    with RedisServer(tmp_path / "redis") as server:
        yield server.url


def configure(broker_url: str, folder: Path):
    """The worker's app on ``broker_url``, without the connections it cached for the last test's broker
    (configure() is meant to run once per process; Celery keeps its first connection pool)."""
    settings = load_settings(
        broker={"url": broker_url, "result_backend": f"db+sqlite:///{folder}/results.sqlite"},
        audit={"path": str(folder / "audit.jsonl")},
    )
    app = celery_app.configure(settings)
    app._pool = None
    app.amqp._producer_pool = None
    return app


@pytest.fixture
def app(broker_url, tmp_path):
    yield configure(broker_url, tmp_path)
    configure(f"sqla+sqlite:///{tmp_path}/idle.sqlite", tmp_path)  # not the Redis server that stops now
    audit.configure(None)


def waiting(app, queue: str) -> int:
    with app.connection_for_read() as connection:
        return int(connection.default_channel.queue_declare(queue=queue, passive=True).message_count)


def take(app, count: int) -> list[str]:
    """Task names of the next ``count`` messages, taken one at a time like a worker with prefetch 1."""
    taken: list[str] = []

    def receive(body, message) -> None:
        taken.append(message.headers["task"])
        message.ack()

    with app.connection_for_read() as connection:
        queues = [app.amqp.queues[name] for name in CONSUMED_QUEUES]
        with app.amqp.TaskConsumer(connection, queues=queues, accept=["json"], callbacks=[receive]) as consumer:
            consumer.qos(prefetch_count=1)
            while len(taken) < count:
                connection.drain_events(timeout=DRAIN_TIMEOUT_S)
    return taken


def test_deliveries_and_hl7_results_are_routed_to_the_delivery_queue(app) -> None:
    app.send_task(DELIVER_TASK, args=[{}], task_id="m1:pacs")
    app.send_task(HL7_TASK, args=[{}], task_id="m1:hl7:ris")
    app.send_task(ANALYSE_STUDY_TASK, args=[{}], task_id="m2")
    assert (waiting(app, DELIVERY_QUEUE), waiting(app, ANALYSIS_QUEUE)) == (2, 1)


def test_the_sweepers_publisher_sends_a_delivery_to_its_queue_too(app, broker_url) -> None:
    publisher = Publisher(broker_url)
    try:
        publisher.send(DELIVER_TASK, [{}], task_id="m1:pacs", retries=2)
        publisher.send(ANALYSE_STUDY_TASK, [{}], task_id="m2")
    finally:
        publisher.close()
    assert (waiting(app, DELIVERY_QUEUE), waiting(app, ANALYSIS_QUEUE)) == (1, 1)


def test_waiting_results_are_taken_before_analyses_queued_earlier(app) -> None:
    for number in range(3):
        app.send_task(ANALYSE_STUDY_TASK, args=[{}], task_id=f"analysis-{number}")
    app.send_task(DELIVER_TASK, args=[{}], task_id="m0:pacs")
    app.send_task(HL7_TASK, args=[{}], task_id="m0:hl7:ris")
    # (round-robin, kombu's default for both brokers, would take an analysis second)
    assert take(app, 5) == [DELIVER_TASK, HL7_TASK, ANALYSE_STUDY_TASK, ANALYSE_STUDY_TASK, ANALYSE_STUDY_TASK]
