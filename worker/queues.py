"""Queues — results of studies already analysed (DICOM deliveries, HL7 messages) have a queue of their
own, which a worker takes from before the analysis queue: a burst of new studies does not hold back
the results of those before it.

The order holds with both brokers. Redis: kombu's ``queue_order_strategy: priority`` (set by
worker.celery_app) makes the worker's BRPOP name the queues in the order it consumes them, and Redis
answers from the first one that holds a message. The SQLAlchemy broker of the embedded defaults
(``sqla+sqlite://``) takes from its queues round-robin and has no such option: the worker uses
:class:`InOrderTransport`, the same transport polling its queues in the order they are consumed.
"""

from queue import Empty

from kombu.transport import sqlalchemy

from common.messages import DELIVERY_QUEUE
from common.messages import QUEUE as ANALYSIS_QUEUE

CONSUMED_QUEUES = (DELIVERY_QUEUE, ANALYSIS_QUEUE)  # what a worker takes from, first things first
SQLALCHEMY_PREFIXES = ("sqla+", "sqlalchemy+")  # kombu's URL prefixes of its SQLAlchemy transport
IN_ORDER_TRANSPORT = f"{__name__}:InOrderTransport"


class InOrderChannel(sqlalchemy.Channel):
    """kombu's SQLAlchemy channel, taking the oldest message of the first queue that has one."""

    def _get_many(self, queues, timeout=None) -> None:
        """Deliver one message, looking at ``queues`` in the order the worker consumes them (the virtual
        channel calls this, when defined, instead of its round-robin cycle)."""
        for queue in queues:
            try:
                message = self._get(queue)
            except Empty:
                continue  # this queue is empty: look at the next
            self.connection._deliver(message, queue)
            return
        raise Empty()


class InOrderTransport(sqlalchemy.Transport):
    Channel = InOrderChannel


def worker_broker(url: str) -> tuple[str, str | None]:
    """(broker URL, kombu transport) for the worker's Celery app: an SQLAlchemy broker URL loses its
    ``sqla+`` prefix (kombu would choose its own transport by it) and gets :class:`InOrderTransport`;
    any other URL is kept, with the transport its scheme names (None)."""
    for prefix in SQLALCHEMY_PREFIXES:
        if url.startswith(prefix):
            return url.removeprefix(prefix), IN_ORDER_TRANSPORT
    return url, None
