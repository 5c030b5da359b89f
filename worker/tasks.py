"""Tasks — thin Celery adapters: a StudyReady message is analysed (pipeline), its files are routed to
destinations (one delivery task each), and every outcome is recorded in the store.

Every round ends visibly: an analysis that raises anything is recorded as failed (with the reason and a
dead letter to replay it); a delivery that raises anything unexpected is dead-lettered; what a dead
process or a lost message leaves behind is sent again by the sweeper (worker/reconcile.py)."""

import functools
import logging
import time
import uuid
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

from celery.exceptions import SoftTimeLimitExceeded

from common import audit
from common.messages import ANALYSE_STUDY_TASK, StudyReady
from common.scu import DeliveryError
from config.settings import Settings
from inference.classifier import Classifier, load_model
from worker.celery_app import app, current_settings
from worker.deliver import (DELIVER_TASK, AnalysisJob, DeadLetter, DeliveryJob, choose_destinations, dead_letters_for,
                            describe_failure, new_dead_letter, retry_delay_s, send_files)
from worker.hl7_result import HL7_TASK, Hl7DeliveryError, Hl7Job, build_oru, read_patient_header, send_mllp
from worker.pipeline import analyse_study, device_uid_for
from worker.reconcile import Claim, Limits, claim_round
from worker.record import DeliveryStatus, Store, StudyResult, StudyStatus

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
    classifier: Classifier | None = None
    try:
        classifier, gate = load_model(settings.model)
        claim = claim_round(store(), analysing_result(ready, classifier), Limits.of(settings))
        if claim in (Claim.DONE, Claim.RUNNING):
            log.info("study round %s %s; skipped", ready.message_id,
                     "already handled" if claim is Claim.DONE else "is being analysed by another worker process")
            return {"message_id": ready.message_id, "skipped": True}
        if claim is Claim.GIVE_UP:
            return record_analysis_failure(
                ready, classifier, f"the analysis was started {settings.worker.max_analysis_attempts} times and never "
                                   f"finished (its worker process died each time)")
        audit.record("analysing", message_id=ready.message_id, study_uid=ready.study_instance_uid, round=ready.round)
        return analyse_and_route(ready, settings, classifier, gate)
    except SoftTimeLimitExceeded:
        return record_analysis_failure(ready, classifier,
                                       f"analysis took longer than {settings.worker.soft_time_limit_s:.0f} s")
    except Exception as error:  # the boundary: any other failure also ends the round visibly
        return record_analysis_failure(ready, classifier, describe_failure(error), error)


def analyse_and_route(ready: StudyReady, settings: Settings, classifier: Classifier, gate) -> dict:
    """The analysis proper: outputs into the outbox, deliveries and HL7 results queued, outcome recorded."""
    started = time.perf_counter()
    outcome = analyse_study(ready, classifier, gate, settings.worker.outbox_dir,
                            device_uid=device_uid_for(settings.node.ae_title),
                            max_long_side=settings.worker.sc_max_long_side)
    modalities = {str(finding.source.get("Modality", "")) for finding in outcome.findings}
    destinations = [] if settings.delivery.shadow_mode else choose_destinations(
        settings, calling_ae=ready.calling_ae, modalities=modalities, finding=outcome.finding, status=outcome.status)
    top = outcome.top
    # the study's point: its finding's image's population's; nothing analysed: the first population's
    point = outcome.operating_point or classifier.operating_point
    first = outcome.findings[0].source
    result = StudyResult(
        message_id=ready.message_id, study_instance_uid=ready.study_instance_uid, round=ready.round,
        calling_ae=ready.calling_ae, modality=str(first.get("Modality", "")) or None,
        accession_number=str(first.get("AccessionNumber", "")) or None,
        status=outcome.status,
        finding=outcome.finding, probability=None if top is None else top.probability,
        threshold=point.threshold, model_version=classifier.version,
        model_sha256=classifier.card.weights_sha256, images=outcome.images, timings_ms=outcome.timings_ms,
        received_at=ready.first_received_at)
    for name in destinations:
        job = DeliveryJob(ready.message_id, ready.study_instance_uid, name, [str(path) for path in outcome.files])
        deliver_task.apply_async(args=[asdict(job)], task_id=f"{ready.message_id}:{name}")
    for endpoint in [] if settings.delivery.shadow_mode else settings.hl7.endpoints:  # analysed or not: say so
        job = Hl7Job(ready.message_id, endpoint.name, ready.study_instance_uid, outcome.finding,
                     None if top is None else top.probability, point.threshold, classifier.version,
                     classifier.card.weights_sha256, datetime.now(timezone.utc).isoformat(), result.accession_number,
                     outcome.output_uids, point.name, outcome.remark)
        send_hl7_task.apply_async(args=[asdict(job)], task_id=f"{ready.message_id}:hl7:{endpoint.name}")
    store().save_outcome(result, destinations)
    audit.record("analysed", message_id=ready.message_id, study_uid=ready.study_instance_uid, round=ready.round,
                 calling_ae=ready.calling_ae, finding=outcome.finding, probability=result.probability,
                 model_version=classifier.version, model_sha256=classifier.card.weights_sha256,
                 status=outcome.status, operating_point=point.name,
                 outside_intended_use=outcome.gate_counts(), shadow_mode=settings.delivery.shadow_mode,
                 instances=[image["sop_instance_uid"] for image in outcome.images],
                 outputs=outcome.output_uids,
                 destinations=destinations, duration_ms=round((time.perf_counter() - started) * 1000, 1),
                 inference_ms=round(outcome.timings_ms.get("model_heatmap", 0.0), 1))
    log.info("study round %s analysed: %s (%d images, %d outputs) → %s", ready.message_id, outcome.finding,
             len(outcome.findings), len(outcome.files), ", ".join(destinations) or "no destination")
    return {"message_id": ready.message_id, "finding": outcome.finding, "destinations": destinations}


def record_analysis_failure(ready: StudyReady, classifier: Classifier | None, reason: str,
                            error: BaseException | None = None) -> dict:
    """Record the round as failed with ``reason`` and a dead letter to replay it, audit and log it —
    unless another attempt already recorded a final outcome. If the store itself fails here, the
    exception propagates and the sweeper sends the round again later."""
    letter = new_dead_letter(AnalysisJob(ready.message_id, ready.study_instance_uid, ready.model_dump(mode="json")),
                             reason, attempts=1)
    if not store().record_failure(failed_result(ready, classifier, reason), letter.id, letter.to_json()):
        log.warning("study round %s: an analysis attempt failed (%s), but another one recorded the outcome; kept it",
                    ready.message_id, reason)
        return {"message_id": ready.message_id, "skipped": True}
    audit.record("failed", stage="analysis", message_id=ready.message_id, study_uid=ready.study_instance_uid,
                 round=ready.round, model_sha256=None if classifier is None else classifier.card.weights_sha256,
                 outcome=reason, final=True, dead_letter=letter.id)
    # with the traceback: lungvision.logfilter keeps its frames and redacts the exception's message
    log.error("study round %s: analysis failed, recorded as failed and dead-lettered as %s: %s", ready.message_id,
              letter.id, reason, exc_info=error)
    return {"message_id": ready.message_id, "failed": True, "dead_letter": letter.id}


def analysing_result(ready: StudyReady, classifier: Classifier) -> StudyResult:
    """The placeholder row of a study round whose analysis has started."""
    return StudyResult(
        message_id=ready.message_id, study_instance_uid=ready.study_instance_uid, round=ready.round,
        calling_ae=ready.calling_ae, modality=None, accession_number=None, status=StudyStatus.ANALYSING,
        finding="PENDING", probability=None, threshold=classifier.threshold, model_version=classifier.version,
        model_sha256=classifier.card.weights_sha256, images=[], timings_ms={}, received_at=ready.first_received_at)


MODEL_UNAVAILABLE = "unavailable"  # model version of a failed round when the model itself could not be loaded


def failed_result(ready: StudyReady, classifier: Classifier | None, reason: str) -> StudyResult:
    """The outcome row of a study round that could not be analysed at all (``classifier``: None when
    loading the model was what failed)."""
    return StudyResult(
        message_id=ready.message_id, study_instance_uid=ready.study_instance_uid, round=ready.round,
        calling_ae=ready.calling_ae, modality=None, accession_number=None, status=StudyStatus.FAILED,
        finding="NOT_ANALYSED", probability=None, threshold=0.0 if classifier is None else classifier.threshold,
        model_version=MODEL_UNAVAILABLE if classifier is None else classifier.version,
        model_sha256="" if classifier is None else classifier.card.weights_sha256, images=[{"error": reason}],
        timings_ms={}, received_at=ready.first_received_at)


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
        reason = str(error) if isinstance(error, (DeliveryError, LookupError, OSError)) else describe_failure(error)
        if transient and attempt < settings.delivery.max_attempts:
            store().update_delivery(delivery.message_id, delivery.destination, status=DeliveryStatus.RETRYING,
                                    attempts=attempt, error=reason)
            delay = retry_delay_s(attempt, settings.delivery.retry_base_delay_s, settings.delivery.retry_max_delay_s)
            log.warning("delivery of %s to %s failed (attempt %d), retry in %.0f s: %s", delivery.message_id,
                        delivery.destination, attempt, delay, reason)
            audit.record("failed", stage="delivery", message_id=delivery.message_id,
                         study_uid=delivery.study_instance_uid, destination=delivery.destination, attempts=attempt,
                         outcome=reason[:300], final=False, retry_in_s=round(delay, 1),
                         model_sha256=_sha_of(delivery))
            raise self.retry(countdown=delay, exc=error)
        letter = dead_letters_for(settings, store()).add(delivery, reason, attempt)
        store().update_delivery(delivery.message_id, delivery.destination, status=DeliveryStatus.FAILED,
                                attempts=attempt, error=reason)
        audit.record("failed", stage="delivery", message_id=delivery.message_id,
                     study_uid=delivery.study_instance_uid, destination=delivery.destination, attempts=attempt,
                     outcome=reason[:300], final=True, dead_letter=letter.id, model_sha256=_sha_of(delivery))
        log.error("delivery of %s to %s dead-lettered as %s after %d attempt(s): %s", delivery.message_id,
                  delivery.destination, letter.id, attempt, reason)
        return "failed"
    store().update_delivery(delivery.message_id, delivery.destination, status=DeliveryStatus.DELIVERED,
                            attempts=attempt)
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
    (same back-off and attempts), give up with a ``failed`` audit event after the last attempt, on a
    permanent failure and on any unexpected exception."""
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
    except Exception as error:
        transient = isinstance(error, Hl7DeliveryError) and error.transient
        # OSError: the outbox file could not be read; other unexpected exceptions: type and place only
        reason = str(error) if isinstance(error, (Hl7DeliveryError, OSError)) else describe_failure(error)
        final = not transient or attempt >= settings.delivery.max_attempts
        delay = retry_delay_s(attempt, settings.delivery.retry_base_delay_s, settings.delivery.retry_max_delay_s)
        audit.record("failed", stage="hl7", message_id=message_id, study_uid=oru_job.study_instance_uid,
                     destination=destination, attempts=attempt, outcome=reason[:300], final=final,
                     model_sha256=oru_job.model_sha256)
        if final:
            log.error("HL7 result of %s to %s given up after %d attempt(s): %s", message_id, name, attempt, reason)
            return "failed"
        log.warning("HL7 result of %s to %s failed (attempt %d), retry in %.0f s: %s", message_id, name, attempt,
                    delay, reason)
        raise self.retry(countdown=delay, exc=error)
    audit.record("delivered", message_id=message_id, study_uid=oru_job.study_instance_uid, destination=destination,
                 attempts=attempt, outcome="ACK AA", finding=oru_job.finding, model_sha256=oru_job.model_sha256)
    log.info("HL7 result of %s sent to %s (attempt %d)", message_id, name, attempt)
    return "delivered"


def replay_dead_letter(settings: Settings, letter_id: str) -> DeadLetter | None:
    """Take one dead letter off the list and queue its analysis or delivery again with a fresh set of
    attempts (None when there is no such id). Used by ``lungvision jobs retry`` and the worklist page.

    The round (or delivery) is marked as waiting before the task is sent, so if sending fails the
    sweeper sends it later (``worker.requeue_after_s``) instead of the replay being lost."""
    letter = dead_letters_for(settings, store()).take(letter_id)
    if letter is None:
        return None
    job = letter.job
    if isinstance(job, AnalysisJob):
        store().mark_replayed(job.message_id, datetime.now(timezone.utc))
        analyse_study_task.apply_async(args=[job.message], task_id=job.message_id)
        outcome = "queued for analysis"
    else:
        store().update_delivery(job.message_id, job.destination, status=DeliveryStatus.PENDING, attempts=0)
        deliver_task.apply_async(args=[asdict(job)])
        outcome = "queued for delivery"
    audit.record("replayed", dead_letter=letter_id, message_id=job.message_id, study_uid=job.study_instance_uid,
                 destination=job.destination, outcome=outcome, model_sha256=_sha_of(job))
    return letter
