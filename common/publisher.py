"""Publisher — sends the worker's tasks by name (common/messages.py), so a process that is no worker (the
sweeper, the web, ``lungvision jobs``) needs no worker code (and no torch); and counts what waits in a
queue."""

from celery import Celery
from kombu.exceptions import OperationalError

from common.messages import QUEUE, TASK_ROUTES, BrokerUnavailable

SEND_RETRY_POLICY = {"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 1.0}


class Publisher:
    """A Celery client of the broker at ``broker_url``: no result backend, JSON only, results (deliveries,
    HL7) routed to their own queue as the worker routes them."""

    def __init__(self, broker_url: str, connection_timeout_s: float = 5.0) -> None:
        self._app = Celery("lungvision-publisher", broker=broker_url, set_as_current=False)
        self._app.conf.update(
            task_serializer="json",
            accept_content=["json"],
            broker_connection_timeout=connection_timeout_s,
            task_default_queue=QUEUE,
            task_routes=TASK_ROUTES,
        )

    def send(self, task_name: str, args: list, *, task_id: str | None = None, retries: int = 0) -> None:
        """Publish one task on its queue (``task_id`` None: a fresh one). Raises BrokerUnavailable."""
        try:
            self._app.send_task(
                task_name, args=args, task_id=task_id, retries=retries, retry=True, retry_policy=SEND_RETRY_POLICY
            )
        except OperationalError as error:
            raise BrokerUnavailable(str(error)) from error

    def waiting(self, queue: str = QUEUE, connect_timeout_s: float = 2.0) -> int:
        """How many messages wait in ``queue`` (Redis list or the SQLite broker's table)."""
        with self._app.connection_for_read(connect_timeout=connect_timeout_s) as connection:
            connection.ensure_connection(max_retries=1)
            return int(connection.default_channel.queue_declare(queue=queue, passive=True).message_count)

    def close(self) -> None:
        self._app.close()
