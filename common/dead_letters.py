"""Dead letters — a delivery that used up its attempts, or an analysis that failed, waits in the outcome store
(never in the broker, which may lose its data) until an operator replays it: ``lungvision jobs retry`` or the
worklist's dead-letter page. Replaying sends the task again by name (common/publisher.py), so neither needs
the worker's code."""

import json
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

from common import audit
from common.messages import ANALYSE_STUDY_TASK, DELIVER_TASK
from common.publisher import Publisher
from common.results import DeliveryStatus
from common.store import Store

ANALYSIS_STAGE = "(analysis)"  # what an analysis dead letter shows where a delivery names its destination


@dataclass(frozen=True)
class DeliveryJob:
    """One study round's files for one destination — the argument of the delivery task."""

    message_id: str
    study_instance_uid: str
    destination: str
    files: list[str]


@dataclass(frozen=True)
class AnalysisJob:
    """A study round whose analysis failed: its queued message, to analyse it again."""

    message_id: str
    study_instance_uid: str
    message: dict  # the StudyReady message as JSON

    @property
    def destination(self) -> str:
        """Listings show dead letters by destination; an analysis has none, so they say "(analysis)"."""
        return ANALYSIS_STAGE


@dataclass(frozen=True)
class DeadLetter:
    """A delivery that used up its attempts, or an analysis that failed."""

    id: str
    job: DeliveryJob | AnalysisJob
    error: str
    attempts: int
    failed_at: str

    def to_json(self) -> str:
        kind = "analysis" if isinstance(self.job, AnalysisJob) else "delivery"
        return json.dumps({**asdict(self), "kind": kind})


def new_dead_letter(job: DeliveryJob | AnalysisJob, error: str, attempts: int) -> DeadLetter:
    """A dead letter with a fresh short id, stamped now."""
    return DeadLetter(uuid.uuid4().hex[:12], job, error, attempts, datetime.now(UTC).isoformat())


class DeadLetters:
    """The dead-letter list, a table of the outcome store."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def add(self, letter: DeadLetter) -> DeadLetter:
        self.store.put_dead_letter(letter.id, letter.to_json())
        return letter

    def list(self) -> list[DeadLetter]:
        """All dead letters, oldest first."""
        letters = [_letter(json.loads(raw)) for raw in self.store.dead_letters()]
        return sorted(letters, key=lambda letter: letter.failed_at)

    def take(self, letter_id: str) -> DeadLetter | None:
        """Remove and return one dead letter (None if there is no such id)."""
        raw = self.store.take_dead_letter(letter_id)
        return None if raw is None else _letter(json.loads(raw))

    def replay(self, letter_id: str, publisher: Publisher) -> DeadLetter | None:
        """Take one dead letter off the list and queue its analysis or delivery again with a fresh set of
        attempts, and audit it (None when there is no such id).

        The round (or delivery) is marked as waiting before the task is sent, so if sending fails the
        sweeper sends it later (``worker.requeue_after_s``) instead of the replay being lost."""
        letter = self.take(letter_id)
        if letter is None:
            return None
        job = letter.job
        if isinstance(job, AnalysisJob):
            self.store.mark_replayed(job.message_id, datetime.now(UTC))
            publisher.send(ANALYSE_STUDY_TASK, [job.message], task_id=job.message_id)
            outcome = "queued for analysis"
        else:
            self.store.update_delivery(job.message_id, job.destination, status=DeliveryStatus.PENDING, attempts=0)
            publisher.send(DELIVER_TASK, [asdict(job)])
            outcome = "queued for delivery"
        result = self.store.result(job.message_id)
        audit.record(
            "replayed",
            dead_letter=letter_id,
            message_id=job.message_id,
            study_uid=job.study_instance_uid,
            destination=job.destination,
            outcome=outcome,
            model_sha256=None if result is None else result.model_sha256,
        )
        return letter


def _letter(data: dict) -> DeadLetter:
    kind = data.pop("kind", "delivery")  # records of earlier versions have no kind: they are deliveries
    job = AnalysisJob(**data["job"]) if kind == "analysis" else DeliveryJob(**data["job"])
    return DeadLetter(**{**data, "job": job})
