"""Celery app — the worker's broker, serialisation and reliability settings, each with its reason."""

import os

from celery import Celery
from celery.signals import worker_process_init

from config.settings import Settings, load_settings
from lungvision import audit
from dicom_node.messages import QUEUE

app = Celery("lungvision", include=["worker.tasks"])
app.conf.update(
    task_serializer="json",  # messages are small JSON records; never unpickle what the network sent
    accept_content=["json"],
    result_serializer="json",
    task_acks_late=True,  # acknowledge after the task ran: a crash mid-task puts the study back on the queue
    task_reject_on_worker_lost=True,  # ...also when the worker process is killed (SIGKILL, OOM)
    worker_prefetch_multiplier=1,  # take one study at a time, so one long study holds up no other
    task_default_queue=QUEUE,
    broker_connection_retry_on_startup=True,  # wait for the broker instead of exiting when it is down
    worker_hijack_root_logger=False,  # keep our own log format
)

_settings: Settings | None = None


def configure(settings: Settings) -> Celery:
    """Apply ``settings`` to the app (broker, backend, limits) and keep them for the tasks."""
    global _settings
    _settings = settings
    audit.configure(settings.audit.path)
    app.conf.update(
        broker_url=settings.broker.url,
        result_backend=settings.broker.result_backend,
        worker_concurrency=settings.worker.concurrency,
        task_soft_time_limit=settings.worker.soft_time_limit_s,
        task_time_limit=settings.worker.time_limit_s,
        result_expires=86400,
    )
    if settings.broker.url.startswith(("redis://", "rediss://")):
        # An unacknowledged task returns to the queue after this long (the worker died). Countdown
        # retries are held unacknowledged too, so it must exceed the longest retry delay.
        app.conf.broker_transport_options = {"visibility_timeout": settings.worker.visibility_timeout_s}
    return app


def current_settings() -> Settings:
    """The settings the worker was started with (loaded from the defaults and environment if none)."""
    if _settings is None:
        configure(load_settings())
    return _settings


@worker_process_init.connect
def _share_cores(**_: object) -> None:
    """Give each worker process its share of the CPU cores, so processes do not oversubscribe them."""
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // current_settings().worker.concurrency))
