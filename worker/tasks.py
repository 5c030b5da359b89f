"""Tasks — thin Celery adapters: a StudyReady message is analysed (pipeline), its files are routed to
destinations (one delivery task each), and every outcome is recorded in the store."""

import functools
import logging
import time
import uuid
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

from celery.exceptions import SoftTimeLimitExceeded

from dicom_node.messages import ANALYSE_STUDY_TASK, StudyReady
from dicom_node.scu import DeliveryError
from config.settings import Settings
from inference.classifier import load_model
from lungvision import audit
from worker.celery_app import app, current_settings
from worker.deliver import DeadLetter, DeliveryJob, choose_destinations, dead_letters_for, retry_delay_s, send_files
from worker.hl7_result import Hl7DeliveryError, Hl7Job, build_oru, read_patient_header, send_mllp
from worker.pipeline import analyse_study, device_uid_for
from worker.record import Store, StudyResult

DELIVER_TASK = "lungvision.deliver"
HL7_TASK = "lungvision.send_hl7"
log = logging.getLogger("lungvision.worker")


@functools.lru_cache(maxsize=1)
def store() -> Store:
    """The process's outcome store."""
    return Store(current_settings().store.url)


@app.task(name=ANALYSE_STUDY_TASK)
def analyse_study_task(message: dict) -> dict:
    """Analyse one study round, write its SC/SR files, queue their delivery and record the outcome.

    A row saying "analysing" is written first (the worklist shows it). A message id recorded with
    any other status was fully handled (its deliveries were queued before the record was written),
    so a redelivered message is skipped. A crash before that point reruns the round: the outputs
    have the same UIDs, so destinations replace rather than duplicate them.
    """
    ready = StudyReady.model_validate(message)
    settings = current_settings()
    existing = store().result(ready.message_id)
    if existing is not None and existing.status != "analysing":  # "analysing": a crash interrupted it
        log.info("study round %s already handled; skipped", ready.message_id)
        return {"message_id": ready.message_id, "skipped": True}
    classifier, gate = load_model(settings.model)
    store().save_result(analysing_result(ready, classifier))  # the worklist shows "analysing"
    audit.record("analysing", message_id=ready.message_id, study_uid=ready.study_instance_uid, round=ready.round)
    started = time.perf_counter()
    try:
        outcome = analyse_study(ready, classifier, gate, settings.worker.outbox_dir,
                                device_uid=device_uid_for(settings.node.ae_title),
                                max_long_side=settings.worker.sc_max_long_side)
    except SoftTimeLimitExceeded:
        store().save_result(failed_result(ready, classifier, f"analysis took longer than "
                                                             f"{settings.worker.soft_time_limit_s:.0f} s"))
        audit.record("failed", stage="analysis", message_id=ready.message_id, study_uid=ready.study_instance_uid,
                     model_sha256=classifier.card.weights_sha256, outcome="soft time limit exceeded", final=True)
        log.error("study round %s: analysis exceeded the soft time limit; recorded as failed", ready.message_id)
        return {"message_id": ready.message_id, "failed": True}
    modalities = {str(finding.source.get("Modality", "")) for finding in outcome.findings}
    destinations = [] if settings.delivery.shadow_mode else choose_destinations(
        settings, calling_ae=ready.calling_ae, modalities=modalities, finding=outcome.finding, status=outcome.status)
    top = outcome.top
    first = outcome.findings[0].source
    result = StudyResult(
        message_id=ready.message_id, study_instance_uid=ready.study_instance_uid, round=ready.round,
        calling_ae=ready.calling_ae, modality=str(first.get("Modality", "")) or None,
        accession_number=str(first.get("AccessionNumber", "")) or None,
        status=outcome.status,
        finding=outcome.finding, probability=None if top is None else top.probability,
        threshold=classifier.threshold, model_version=classifier.version,
        model_sha256=classifier.card.weights_sha256, images=outcome.images, timings_ms=outcome.timings_ms,
        received_at=ready.first_received_at)
    for name in destinations:
        job = DeliveryJob(ready.message_id, ready.study_instance_uid, name, [str(path) for path in outcome.files])
        deliver_task.apply_async(args=[asdict(job)], task_id=f"{ready.message_id}:{name}")
    for endpoint in [] if settings.delivery.shadow_mode else settings.hl7.endpoints:  # analysed or not: say so
        job = Hl7Job(ready.message_id, endpoint.name, ready.study_instance_uid, outcome.finding,
                     None if top is None else top.probability, classifier.threshold, classifier.version,
                     classifier.card.weights_sha256, datetime.now(timezone.utc).isoformat(), result.accession_number,
                     outcome.output_uids, classifier.operating_point.name, outcome.remark)
        send_hl7_task.apply_async(args=[asdict(job)], task_id=f"{ready.message_id}:hl7:{endpoint.name}")
    store().save_result(result)
    for name in destinations:
        store().update_delivery(ready.message_id, name, status="pending", attempts=0)
    audit.record("analysed", message_id=ready.message_id, study_uid=ready.study_instance_uid, round=ready.round,
                 calling_ae=ready.calling_ae, finding=outcome.finding, probability=result.probability,
                 model_version=classifier.version, model_sha256=classifier.card.weights_sha256,
                 status=outcome.status, operating_point=classifier.operating_point.name,
                 outside_intended_use=outcome.gate_counts(), shadow_mode=settings.delivery.shadow_mode,
                 instances=[image["sop_instance_uid"] for image in outcome.images],
                 outputs=outcome.output_uids,
                 destinations=destinations, duration_ms=round((time.perf_counter() - started) * 1000, 1),
                 inference_ms=round(outcome.timings_ms.get("model_heatmap", 0.0), 1))
    log.info("study round %s analysed: %s (%d images, %d outputs) → %s", ready.message_id, outcome.finding,
             len(outcome.findings), len(outcome.files), ", ".join(destinations) or "no destination")
    return {"message_id": ready.message_id, "finding": outcome.finding, "destinations": destinations}


def analysing_result(ready: StudyReady, classifier) -> StudyResult:
    """The placeholder row of a study round whose analysis has started."""
    return StudyResult(
        message_id=ready.message_id, study_instance_uid=ready.study_instance_uid, round=ready.round,
        calling_ae=ready.calling_ae, modality=None, accession_number=None, status="analysing", finding="PENDING",
        probability=None, threshold=classifier.threshold, model_version=classifier.version,
        model_sha256=classifier.card.weights_sha256, images=[], timings_ms={}, received_at=ready.first_received_at)


def failed_result(ready: StudyReady, classifier, reason: str) -> StudyResult:
    """The outcome row of a study round that could not be analysed at all."""
    return StudyResult(
        message_id=ready.message_id, study_instance_uid=ready.study_instance_uid, round=ready.round,
        calling_ae=ready.calling_ae, modality=None, accession_number=None, status="failed", finding="NOT_ANALYSED",
        probability=None, threshold=classifier.threshold, model_version=classifier.version,
        model_sha256=classifier.card.weights_sha256, images=[{"error": reason}], timings_ms={},
        received_at=ready.first_received_at)


@app.task(name=DELIVER_TASK, bind=True, max_retries=None)
def deliver_task(self, job: dict) -> str:
    """Send one study round's files to one destination; retry transient failures with back-off,
    dead-letter the job after the last attempt or on a permanent failure."""
    delivery = DeliveryJob(**job)
    settings = current_settings()
    attempt = self.request.retries + 1
    try:
        send_files(settings, delivery.destination, [Path(name) for name in delivery.files])
    except (DeliveryError, LookupError, OSError) as error:  # LookupError: destination no longer configured
        transient = isinstance(error, DeliveryError) and error.transient
        if transient and attempt < settings.delivery.max_attempts:
            store().update_delivery(delivery.message_id, delivery.destination, status="retrying",
                                    attempts=attempt, error=str(error))
            delay = retry_delay_s(attempt, settings.delivery.retry_base_delay_s, settings.delivery.retry_max_delay_s)
            log.warning("delivery of %s to %s failed (attempt %d), retry in %.0f s: %s", delivery.message_id,
                        delivery.destination, attempt, delay, error)
            audit.record("failed", stage="delivery", message_id=delivery.message_id,
                         study_uid=delivery.study_instance_uid, destination=delivery.destination, attempts=attempt,
                         outcome=str(error)[:300], final=False, retry_in_s=round(delay, 1),
                         model_sha256=_sha_of(delivery))
            raise self.retry(countdown=delay, exc=error)
        letter = dead_letters_for(settings, store()).add(delivery, str(error), attempt)
        store().update_delivery(delivery.message_id, delivery.destination, status="failed", attempts=attempt,
                                error=str(error))
        audit.record("failed", stage="delivery", message_id=delivery.message_id,
                     study_uid=delivery.study_instance_uid, destination=delivery.destination, attempts=attempt,
                     outcome=str(error)[:300], final=True, dead_letter=letter.id, model_sha256=_sha_of(delivery))
        log.error("delivery of %s to %s dead-lettered as %s after %d attempt(s): %s", delivery.message_id,
                  delivery.destination, letter.id, attempt, error)
        return "failed"
    store().update_delivery(delivery.message_id, delivery.destination, status="delivered", attempts=attempt)
    audit.record("delivered", message_id=delivery.message_id, study_uid=delivery.study_instance_uid,
                 destination=delivery.destination, attempts=attempt, outcome="success",
                 outputs=[Path(name).stem for name in delivery.files], model_sha256=_sha_of(delivery))
    log.info("delivered %s to %s (%d objects, attempt %d)", delivery.message_id, delivery.destination,
             len(delivery.files), attempt)
    return "delivered"


def _sha_of(delivery: DeliveryJob) -> str | None:
    result = store().result(delivery.message_id)
    return None if result is None else result.model_sha256


@app.task(name=HL7_TASK, bind=True, max_retries=None)
def send_hl7_task(self, job: dict) -> str:
    """Send the ORU^R01 of one analysed study round to one HL7 endpoint; retry like DICOM delivery
    (same back-off and attempts), give up with a ``failed`` audit event after the last attempt."""
    settings = current_settings()
    oru_job = Hl7Job(**job)
    message_id, name = oru_job.message_id, oru_job.endpoint
    destination = f"hl7:{name}"
    attempt = self.request.retries + 1
    endpoint = next((e for e in settings.hl7.endpoints if e.name == name), None)
    try:
        if endpoint is None:
            raise Hl7DeliveryError("endpoint no longer configured", transient=False)
        message = build_oru(oru_job, read_patient_header(settings.worker.outbox_dir, oru_job), settings.hl7, endpoint,
                            control_id=uuid.uuid4().hex[:20])
        send_mllp(endpoint, message, settings.hl7.timeout_s)
    except (Hl7DeliveryError, OSError) as error:  # OSError: the outbox file could not be read
        transient = isinstance(error, Hl7DeliveryError) and error.transient
        final = not transient or attempt >= settings.delivery.max_attempts
        delay = retry_delay_s(attempt, settings.delivery.retry_base_delay_s, settings.delivery.retry_max_delay_s)
        audit.record("failed", stage="hl7", message_id=message_id, study_uid=oru_job.study_instance_uid,
                     destination=destination, attempts=attempt, outcome=str(error)[:300], final=final,
                     model_sha256=oru_job.model_sha256)
        if final:
            log.error("HL7 result of %s to %s given up after %d attempt(s): %s", message_id, name, attempt, error)
            return "failed"
        log.warning("HL7 result of %s to %s failed (attempt %d), retry in %.0f s: %s", message_id, name, attempt,
                    delay, error)
        raise self.retry(countdown=delay, exc=error)
    audit.record("delivered", message_id=message_id, study_uid=oru_job.study_instance_uid, destination=destination,
                 attempts=attempt, outcome="ACK AA", finding=oru_job.finding, model_sha256=oru_job.model_sha256)
    log.info("HL7 result of %s sent to %s (attempt %d)", message_id, name, attempt)
    return "delivered"


def replay_dead_letter(settings: Settings, letter_id: str) -> DeadLetter | None:
    """Take one dead letter off the list and queue its delivery again with a fresh set of attempts
    (None when there is no such id). Used by ``lungvision jobs retry`` and the worklist page."""
    letter = dead_letters_for(settings, store()).take(letter_id)
    if letter is None:
        return None
    deliver_task.apply_async(args=[asdict(letter.job)])
    store().update_delivery(letter.job.message_id, letter.job.destination, status="pending", attempts=0)
    audit.record("replayed", dead_letter=letter_id, message_id=letter.job.message_id,
                 study_uid=letter.job.study_instance_uid, destination=letter.job.destination,
                 outcome="queued for delivery", model_sha256=_sha_of(letter.job))
    return letter
