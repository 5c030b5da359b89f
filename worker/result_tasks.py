"""Result tasks — an analysed round's files go to one destination (C-STORE or a folder), its ORU^R01 to
one HL7 endpoint; transient failures are retried with back-off, and every attempt is recorded
(worker/record.py).

This module imports no model code: ``lungvision deliverer`` runs these tasks in a process of their own
(a pool of threads, each delivery on an association of its own, without torch), so that a study's
objects are sent and acknowledged while the analysis workers go on with the next study. Without a
deliverer (``delivery.by_deliverer`` false), the analysis workers run them, before new studies."""

import functools
import uuid
from pathlib import Path

from common.dead_letters import DeliveryJob
from common.failures import describe_failure
from common.messages import DELIVER_TASK, HL7_TASK
from common.results import DeliveryStatus
from common.scu import DeliveryError, UnsendableFile
from common.store import Store
from config.settings import Settings
from worker.celery_app import app, current_settings
from worker.deliver import retry_delay_s, send_files
from worker.hl7_result import Hl7DeliveryError, Hl7Job, build_oru, read_patient_header, send_mllp
from worker.record import record_delivery, record_hl7


@functools.lru_cache(maxsize=1)
def store() -> Store:
    """The process's outcome store (shared by its threads: SQLAlchemy's engine is thread-safe)."""
    return Store(current_settings().store.url)


@app.task(name=DELIVER_TASK, bind=True, max_retries=None)
def deliver_task(self, job: dict) -> str:
    """Send one study round's files to one destination; retry transient failures with back-off,
    dead-letter the job after the last attempt, on a permanent failure, and on any unexpected exception
    (a bug or a broken file: another attempt would fail the same way)."""
    delivery = DeliveryJob(**job)
    settings = current_settings()
    attempt = self.request.retries + 1
    try:
        send_files(settings, delivery.destination, [Path(name) for name in delivery.files])
    except Exception as error:
        transient = isinstance(error, DeliveryError) and error.transient
        # Our own errors (LookupError: destination no longer configured; OSError: an unreadable outbox file;
        # UnsendableFile: one without file meta) say what happened; any other exception's message might
        # quote a DICOM value: type and place only.
        ours = isinstance(error, (DeliveryError, LookupError, OSError, UnsendableFile))
        reason = str(error) if ours else describe_failure(error)
        if transient and attempt < settings.delivery.max_attempts:
            delay = retry_delay(settings, attempt)
            record_delivery(store(), delivery, DeliveryStatus.RETRYING, attempt, reason=reason, retry_in_s=delay)
            raise self.retry(countdown=delay, exc=error) from error
        record_delivery(store(), delivery, DeliveryStatus.FAILED, attempt, reason=reason)
        return DeliveryStatus.FAILED.value
    record_delivery(store(), delivery, DeliveryStatus.DELIVERED, attempt)
    return DeliveryStatus.DELIVERED.value


@app.task(name=HL7_TASK, bind=True, max_retries=None)
def send_hl7_task(self, job: dict) -> str:
    """Send the ORU^R01 of one analysed study round to one HL7 endpoint; retry like DICOM delivery
    (same back-off and attempts), give up with a ``failed`` audit event after the last attempt, on a
    permanent failure and on any unexpected exception."""
    settings = current_settings()
    oru_job = Hl7Job(**job)
    attempt = self.request.retries + 1
    endpoint = next((e for e in settings.hl7.endpoints if e.name == oru_job.endpoint), None)
    try:
        if endpoint is None:
            raise Hl7DeliveryError("endpoint no longer configured", transient=False)
        patient = read_patient_header(settings.worker.outbox_dir, oru_job)
        message = build_oru(oru_job, patient, settings.hl7, endpoint, control_id=uuid.uuid4().hex[:20])
        send_mllp(endpoint, message, settings.hl7.timeout_s)
    except Exception as error:
        transient = isinstance(error, Hl7DeliveryError) and error.transient
        # OSError: the outbox file could not be read; other unexpected exceptions: type and place only
        reason = str(error) if isinstance(error, (Hl7DeliveryError, OSError)) else describe_failure(error)
        final = not transient or attempt >= settings.delivery.max_attempts
        delay = retry_delay(settings, attempt)
        record_hl7(oru_job, attempt, reason=reason, final=final, retry_in_s=delay)
        if final:
            return DeliveryStatus.FAILED.value
        raise self.retry(countdown=delay, exc=error) from error
    record_hl7(oru_job, attempt)
    return DeliveryStatus.DELIVERED.value


def retry_delay(settings: Settings, attempt: int) -> float:
    """The back-off before the attempt after ``attempt`` (DICOM and HL7 alike)."""
    return retry_delay_s(attempt, settings.delivery.retry_base_delay_s, settings.delivery.retry_max_delay_s)
