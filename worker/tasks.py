"""Tasks — thin Celery adapters: a StudyReady message is loaded, analysed and encoded (pipeline), its files
are queued for delivery (one task per destination and HL7 endpoint), and every outcome is recorded
(worker/record.py: store row, audit event and log line together).

Every round ends visibly: an analysis that raises anything is recorded as failed (with the reason and a
dead letter to replay it); a delivery that raises anything unexpected is dead-lettered; what a dead
process or a lost message leaves behind is sent again by the sweeper (worker/reconcile.py)."""

import functools
import logging
import time
import uuid
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

from celery.exceptions import SoftTimeLimitExceeded

from common import audit
from common.dead_letters import DeliveryJob
from common.failures import describe_failure
from common.messages import ANALYSE_STUDY_TASK, DELIVER_TASK, HL7_TASK, StudyReady
from common.results import DeliveryStatus
from common.scu import DeliveryError
from common.store import Store
from config.settings import Settings
from inference.classifier import load_model
from worker.celery_app import app, current_settings
from worker.deliver import choose_destinations, retry_delay_s, send_files
from worker.hl7_result import Hl7DeliveryError, Hl7Job, build_oru, read_patient_header, send_mllp
from worker.pipeline import StudyOutcome, analyse_study, device_uid_for
from worker.reconcile import Claim, Limits, claim_round
from worker.record import Model, record_analysed, record_analysis_failure, record_delivery, record_hl7, study_result

log = logging.getLogger("lungvision.worker")


@functools.lru_cache(maxsize=1)
def store() -> Store:
    """The process's outcome store."""
    return Store(current_settings().store.url)


@app.task(name=ANALYSE_STUDY_TASK)
def analyse_study_task(message: dict) -> dict:
    """Analyse one study round, write its SC/SR files, queue their delivery and record the outcome.

    First the round is claimed (worker/reconcile.py): a round with a final outcome, or one another
    live process is analysing right now, is skipped; a round whose worker died while analysing it is
    analysed again (its outputs have the same UIDs, so destinations replace rather than duplicate
    them) until ``worker.max_analysis_attempts``. The claim shows the round as "analysing".

    Whatever the analysis raises — the soft time limit, a decoder bug, a full disk, a store error — the
    round is recorded as failed with the reason (no patient data), audited and dead-lettered, so
    ``lungvision jobs retry`` can replay it.
    """
    ready = StudyReady.model_validate(message)
    settings = current_settings()
    model = Model.of(None)
    try:
        classifier, gate = load_model(settings.model)  # load
        model = Model.of(classifier)
        claim = claim_round(store(), study_result(ready, model), Limits.of(settings))
        if claim is not Claim.START:
            return unclaimed(ready, model, claim, settings)
        audit.record("analysing", message_id=ready.message_id, study_uid=ready.study_instance_uid, round=ready.round)
        started = time.perf_counter()
        # analyse and encode
        analysis = analyse_study(
            ready,
            classifier,
            gate,
            settings.worker.outbox_dir,
            device_uid=device_uid_for(settings.node.ae_title),
            max_long_side=settings.worker.sc_max_long_side,
        )
        # deliver
        destinations = queue_deliveries(ready, model, analysis, settings)
        # record
        record_analysed(
            store(), ready, model, analysis, destinations, shadow_mode=settings.delivery.shadow_mode, started=started
        )
        return {"message_id": ready.message_id, "finding": analysis.finding, "destinations": destinations}
    except SoftTimeLimitExceeded:
        limit_s = settings.worker.soft_time_limit_s
        return analysis_failed(ready, model, f"analysis took longer than {limit_s:.0f} s")
    except Exception as error:  # the boundary: any other failure also ends the round visibly
        return analysis_failed(ready, model, describe_failure(error), error)


def unclaimed(ready: StudyReady, model: Model, claim: Claim, settings: Settings) -> dict:
    """The answer for a round this task does not analyse: done or running elsewhere (skipped), or given up."""
    if claim is Claim.GIVE_UP:
        attempts = settings.worker.max_analysis_attempts
        return analysis_failed(
            ready,
            model,
            f"the analysis was started {attempts} times and never finished (its worker process died each time)",
        )
    log.info(
        "study round %s %s; skipped",
        ready.message_id,
        "already handled" if claim is Claim.DONE else "is being analysed by another worker process",
    )
    return {"message_id": ready.message_id, "skipped": True}


def analysis_failed(ready: StudyReady, model: Model, reason: str, error: BaseException | None = None) -> dict:
    """Record the round as failed (worker/record.py) and answer so; skipped when another attempt had
    already recorded its outcome."""
    letter = record_analysis_failure(store(), ready, model, reason, error)
    if letter is None:
        return {"message_id": ready.message_id, "skipped": True}
    return {"message_id": ready.message_id, "failed": True, "dead_letter": letter.id}


def queue_deliveries(ready: StudyReady, model: Model, analysis: StudyOutcome, settings: Settings) -> list[str]:
    """Queue the round's files to each destination its routing rules choose, and its HL7 result to each
    endpoint (analysed or not: the RIS is told); nothing in shadow mode. Returns the destinations."""
    if settings.delivery.shadow_mode:
        return []
    modalities = {str(finding.source.get("Modality", "")) for finding in analysis.findings}
    destinations = choose_destinations(
        settings, calling_ae=ready.calling_ae, modalities=modalities, finding=analysis.finding, status=analysis.status
    )
    files = [str(path) for path in analysis.files]
    for name in destinations:
        job = DeliveryJob(ready.message_id, ready.study_instance_uid, name, files)
        deliver_task.apply_async(args=[asdict(job)], task_id=f"{ready.message_id}:{name}")
    point = model.point_for(analysis)
    for endpoint in settings.hl7.endpoints:
        assert point is not None  # an HL7 result names the point, as every round the worker sends has one
        hl7_job = Hl7Job(
            ready.message_id,
            endpoint.name,
            ready.study_instance_uid,
            analysis.finding,
            analysis.probability,
            point.threshold,
            model.version,
            model.sha256,
            datetime.now(UTC).isoformat(),
            analysis.accession_number,
            analysis.output_uids,
            point.name,
            analysis.remark,
        )
        send_hl7_task.apply_async(args=[asdict(hl7_job)], task_id=f"{ready.message_id}:hl7:{endpoint.name}")
    return destinations


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
        # Our own errors (LookupError: destination no longer configured; OSError: an unreadable outbox file)
        # say what happened; any other exception's message might quote a DICOM value: type and place only.
        ours = isinstance(error, (DeliveryError, LookupError, OSError))
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
