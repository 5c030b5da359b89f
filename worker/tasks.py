"""Tasks — thin Celery adapters: a StudyReady message is analysed (pipeline), its files are routed to
destinations (one delivery task each), and every outcome is recorded in the store."""

import functools
import logging
from dataclasses import asdict
from pathlib import Path

from celery.exceptions import SoftTimeLimitExceeded

from dicom_node.messages import ANALYSE_STUDY_TASK, StudyReady
from dicom_node.scu import DeliveryError
from inference.classifier import load_classifier
from worker.celery_app import app, current_settings
from worker.deliver import DeliveryJob, choose_destinations, dead_letters_for, retry_delay_s, send_files
from worker.pipeline import analyse_study, device_uid_for
from worker.record import Store, StudyResult

DELIVER_TASK = "lungvision.deliver"
log = logging.getLogger("lungvision.worker")


@functools.lru_cache(maxsize=1)
def store() -> Store:
    """The process's outcome store."""
    return Store(current_settings().store.url)


@app.task(name=ANALYSE_STUDY_TASK)
def analyse_study_task(message: dict) -> dict:
    """Analyse one study round, write its SC/SR files, queue their delivery and record the outcome.

    A message id already recorded was fully handled (its deliveries were queued before the record
    was written), so a redelivered message is skipped. A crash before that point reruns the round:
    the outputs have the same UIDs, so destinations replace rather than duplicate them.
    """
    ready = StudyReady.model_validate(message)
    settings = current_settings()
    if store().result(ready.message_id) is not None:
        log.info("study round %s already handled; skipped", ready.message_id)
        return {"message_id": ready.message_id, "skipped": True}
    classifier = load_classifier(settings.model.weights_dir)
    try:
        outcome = analyse_study(ready, classifier, settings.worker.outbox_dir,
                                device_uid=device_uid_for(settings.node.ae_title),
                                max_long_side=settings.worker.sc_max_long_side)
    except SoftTimeLimitExceeded:
        store().save_result(failed_result(ready, classifier, f"analysis took longer than "
                                                             f"{settings.worker.soft_time_limit_s:.0f} s"))
        log.error("study round %s: analysis exceeded the soft time limit; recorded as failed", ready.message_id)
        return {"message_id": ready.message_id, "failed": True}
    modalities = {str(finding.source.get("Modality", "")) for finding in outcome.findings}
    destinations = choose_destinations(settings, calling_ae=ready.calling_ae, modalities=modalities,
                                       finding=outcome.finding)
    top = outcome.top
    first = outcome.findings[0].source
    result = StudyResult(
        message_id=ready.message_id, study_instance_uid=ready.study_instance_uid, round=ready.round,
        calling_ae=ready.calling_ae, modality=str(first.get("Modality", "")) or None,
        accession_number=str(first.get("AccessionNumber", "")) or None,
        status="not_analysed" if top is None else "analysed",
        finding=outcome.finding, probability=None if top is None else top.probability,
        threshold=classifier.card.threshold, model_version=classifier.version,
        model_sha256=classifier.card.weights_sha256, images=outcome.images, timings_ms=outcome.timings_ms,
        received_at=ready.first_received_at)
    for name in destinations:
        job = DeliveryJob(ready.message_id, ready.study_instance_uid, name, [str(path) for path in outcome.files])
        deliver_task.apply_async(args=[asdict(job)], task_id=f"{ready.message_id}:{name}")
    store().save_result(result)
    for name in destinations:
        store().update_delivery(ready.message_id, name, status="pending", attempts=0)
    log.info("study round %s analysed: %s (%d images, %d outputs) → %s", ready.message_id, outcome.finding,
             len(outcome.findings), len(outcome.files), ", ".join(destinations) or "no destination")
    return {"message_id": ready.message_id, "finding": outcome.finding, "destinations": destinations}


def failed_result(ready: StudyReady, classifier, reason: str) -> StudyResult:
    """The outcome row of a study round that could not be analysed at all."""
    return StudyResult(
        message_id=ready.message_id, study_instance_uid=ready.study_instance_uid, round=ready.round,
        calling_ae=ready.calling_ae, modality=None, accession_number=None, status="failed", finding="NOT_ANALYSED",
        probability=None, threshold=classifier.card.threshold, model_version=classifier.version,
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
            raise self.retry(countdown=delay, exc=error)
        letter = dead_letters_for(settings, store()).add(delivery, str(error), attempt)
        store().update_delivery(delivery.message_id, delivery.destination, status="failed", attempts=attempt,
                                error=str(error))
        log.error("delivery of %s to %s dead-lettered as %s after %d attempt(s): %s", delivery.message_id,
                  delivery.destination, letter.id, attempt, error)
        return "failed"
    store().update_delivery(delivery.message_id, delivery.destination, status="delivered", attempts=attempt)
    log.info("delivered %s to %s (%d objects, attempt %d)", delivery.message_id, delivery.destination,
             len(delivery.files), attempt)
    return "delivered"
