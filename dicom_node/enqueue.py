"""Queue stage: a StudyReady message → one Celery task on the broker (the node's only Celery call).

The task is sent by name, so the node never imports the worker (or torch). Its task id is the
message's ``message_id``, minted once when the round was sealed: if the node dies after the broker
took the message but before the spool recorded it, the restart re-sends the *same* id, and the
worker treats a task id it has already run as done.
"""

from celery import Celery
from kombu.exceptions import OperationalError

from common.messages import ANALYSE_STUDY_TASK, QUEUE, BrokerUnavailable, StudyReady

_SEND_RETRY_POLICY = {  # a short in-call retry; the dispatcher retries later with its own back-off
    "max_retries": 2,
    "interval_start": 0.2,
    "interval_step": 0.5,
    "interval_max": 1.0,
}


class CeleryEnqueuer:
    """Publishes StudyReady messages to the ``lungvision`` queue."""

    def __init__(self, broker_url: str, connection_timeout_s: float = 5.0) -> None:
        self._app = Celery("lungvision-node", broker=broker_url, set_as_current=False)
        self._app.conf.update(
            task_serializer="json",  # the worker accepts JSON only: no pickle from the network side
            accept_content=["json"],
            broker_connection_timeout=connection_timeout_s,  # a dead broker fails fast instead of hanging dispatch
        )

    def send(self, message: StudyReady) -> str:
        """Publish ``message``; return the task id. Raises :class:`BrokerUnavailable`."""
        try:
            self._app.send_task(
                ANALYSE_STUDY_TASK,
                args=message.as_task_args(),
                queue=QUEUE,
                task_id=message.message_id,
                retry=True,
                retry_policy=_SEND_RETRY_POLICY,
            )
        except OperationalError as error:
            raise BrokerUnavailable(str(error)) from error
        return message.message_id

    def close(self) -> None:
        self._app.close()
