"""Celery app — the worker's broker, serialisation and reliability settings, each with its reason."""

from celery import Celery
from celery.signals import (
    after_setup_logger,
    after_setup_task_logger,
    worker_process_init,
    worker_process_shutdown,
    worker_shutdown,
)

from common import audit, logfilter
from common.messages import QUEUE, TASK_ROUTES
from config.settings import Settings, load_settings
from worker.deliver import close_association_pool
from worker.queues import worker_broker

app = Celery("lungvision")  # its task modules: configure()
app.conf.update(
    task_serializer="json",  # messages are small JSON records; never unpickle what the network sent
    accept_content=["json"],
    result_serializer="json",
    task_acks_late=True,  # acknowledge after the task ran: a crash mid-task puts the study back on the queue
    task_reject_on_worker_lost=True,  # ...also when the worker process is killed (SIGKILL, OOM)
    worker_prefetch_multiplier=1,  # take one study at a time, so one long study holds up no other
    task_default_queue=QUEUE,
    task_routes=TASK_ROUTES,  # results (DICOM, HL7) go to a queue the worker takes from first (worker/queues.py)
    broker_connection_retry_on_startup=True,  # wait for the broker instead of exiting when it is down
    worker_hijack_root_logger=False,  # keep our own log format
    # Nothing reads a task's return value (outcomes are in the store): storing it cost a write to the result
    # backend per task (with the default SQLite backend, a transaction and its fsync). A task that fails or is
    # retried still leaves its state and traceback there, for whoever looks into it.
    task_ignore_result=True,
    task_store_errors_even_if_ignored=True,
)

_settings: Settings | None = None


ANALYSIS_TASKS = "worker.tasks"  # the analysis and, for a worker without deliverer, the result tasks
RESULT_TASKS = "worker.result_tasks"  # a deliverer's: sending results (imports no model code)


def configure(settings: Settings, *, deliverer: bool = False) -> Celery:
    """Apply ``settings`` to the app (broker, backend, limits) and keep them for the tasks; a ``deliverer``
    imports only the result tasks (no model code: no torch in its process)."""
    global _settings
    _settings = settings
    audit.configure(settings.audit.path)
    broker_url, broker_transport = worker_broker(settings.broker.url)
    app.conf.update(
        include=[RESULT_TASKS if deliverer else ANALYSIS_TASKS],
        broker_url=broker_url,
        broker_transport=broker_transport,  # the SQLAlchemy broker: one that takes from its queues in order
        result_backend=settings.broker.result_backend,
        worker_concurrency=settings.worker.concurrency,
        task_soft_time_limit=settings.worker.soft_time_limit_s,
        task_time_limit=settings.worker.time_limit_s,
        result_expires=86400,
    )
    # (the SQLAlchemy transport would hand Redis options to create_engine: set them for Redis only)
    is_redis = settings.broker.url.startswith(("redis://", "rediss://"))
    app.conf.broker_transport_options = redis_transport_options(settings) if is_redis else {}
    return app


UNACKED_MUTEX_EXPIRE_S = 60  # kombu's default: 300


def redis_transport_options(settings: Settings) -> dict:
    """kombu's Redis options that bound how late a killed worker's task returns to the queue:
    ``visibility_timeout_s`` + ``unacked_restore_interval_s`` (+ 60 s, once, if the process that died
    was itself restoring tasks at that moment and held kombu's restore lock)."""
    return {
        # An unacknowledged task returns to the queue after this long (the worker died). Countdown
        # retries are held unacknowledged too, so it must exceed the longest retry delay.
        "visibility_timeout": settings.worker.visibility_timeout_s,
        # Each worker looks for such tasks every interval × throttle seconds; kombu's 10 × 10 made the
        # look up to 100 s late. Throttle 1: every interval.
        "unacked_restore_interval": settings.worker.unacked_restore_interval_s,
        "unacked_restore_throttle": 1,
        # The lock a restoring worker holds (milliseconds per look) expires after this if it dies holding it.
        "unacked_mutex_expire": UNACKED_MUTEX_EXPIRE_S,
        # Take from the queues in the order the worker consumes them (deliveries first), not round-robin.
        "queue_order_strategy": "priority",
    }


def current_settings() -> Settings:
    """The settings the worker was started with (loaded from the defaults and environment if none)."""
    if _settings is None:
        configure(load_settings())
    assert _settings is not None  # configure() sets it
    return _settings


@worker_process_init.connect
def _prepare_pool_process(**_: object) -> None:
    """A pool process starts: its share of the cores, the model it inherited (worker/preload.py)."""
    from worker.preload import prepare_pool_process

    prepare_pool_process(current_settings())


@worker_process_shutdown.connect
@worker_shutdown.connect
def _release_kept_associations(**_: object) -> None:
    """The worker (a pool process, or a solo worker) stops: release the associations it keeps open."""
    close_association_pool()


@after_setup_logger.connect
@after_setup_task_logger.connect
def _keep_patient_data_out_of_logs(logger, **_: object) -> None:
    """Celery has set up its log handlers: scrub every record of this process (lungvision.logfilter)."""
    logfilter.install(logger)
