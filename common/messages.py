"""Queue contract: a sealed study round → the StudyReady message the worker's analyse_study task receives;
the names of the worker's tasks and queues, so that other processes send tasks by name without
importing the worker."""

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

ANALYSE_STUDY_TASK = "lungvision.analyse_study"  # Celery task name the worker registers
DELIVER_TASK = "lungvision.deliver"  # one round's files to one destination
HL7_TASK = "lungvision.send_hl7"  # one analysed round's ORU^R01 to one endpoint
QUEUE = "lungvision"  # Celery queue (a Redis list of that name with the Redis broker)
DELIVERY_QUEUE = "lungvision.delivery"  # results (DICOM, HL7): a worker takes them first (worker/queues.py)
TASK_ROUTES = {DELIVER_TASK: {"queue": DELIVERY_QUEUE}, HL7_TASK: {"queue": DELIVERY_QUEUE}}
SCHEMA_VERSION = 1


class BrokerUnavailable(RuntimeError):
    """The broker could not take a message (the node's StudyReady, the worker's re-sent round or
    delivery); nothing was queued and the sender retries later."""


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InstanceRef(_Message):
    """One spooled instance: identifiers and where its Part-10 file lies — never pixel data."""

    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    path: str  # absolute path of the Part-10 file in the spool
    calling_ae: str | None  # None when the arrival record was lost in a crash
    received_at: datetime


class StudyReady(_Message):
    """A study round is complete: ``stable_seconds`` passed without a new instance."""

    schema_version: int = SCHEMA_VERSION
    message_id: str  # minted once when the round is sealed; also the Celery task id (idempotency key)
    study_instance_uid: str
    round: int = Field(ge=1)  # 1 for the first batch; later arrivals for the same study make round 2, 3, ...
    spool_dir: str  # absolute path of the round's folder
    calling_ae: str | None  # AE title that sent the round's first instance
    first_received_at: datetime
    last_received_at: datetime
    instances: list[InstanceRef] = Field(min_length=1)

    def as_task_args(self) -> list[dict]:
        """The JSON-ready positional arguments of the Celery task."""
        return [self.model_dump(mode="json")]
