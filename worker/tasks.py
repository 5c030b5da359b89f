"""Tasks — thin Celery adapters: a StudyReady message is loaded, analysed and encoded (pipeline), its files
are queued for delivery (one task per destination and HL7 endpoint, worker/result_tasks.py), and every
outcome is recorded (worker/record.py: store row, audit event and log line together).

Every round ends visibly: an analysis that raises anything is recorded as failed (with the reason and a
dead letter to replay it); a delivery that raises anything unexpected is dead-lettered; what a dead
process or a lost message leaves behind is sent again by the sweeper (worker/reconcile.py)."""

import logging
import time
from dataclasses import asdict
from datetime import UTC, datetime

from celery.exceptions import SoftTimeLimitExceeded

from common import audit
from common.dead_letters import DeliveryJob
from common.failures import describe_failure
from common.messages import ANALYSE_STUDY_TASK, StudyReady
from config.settings import Settings
from inference.classifier import load_model
from worker.celery_app import app, current_settings
from worker.deliver import choose_destinations
from worker.hl7_result import Hl7Job
from worker.pipeline import StudyOutcome, analyse_study, device_uid_for
from worker.reconcile import Claim, Limits, claim_round
from worker.record import Model, record_analysed, record_analysis_failure, study_result
from worker.result_tasks import deliver_task, send_hl7_task, store

log = logging.getLogger("lungvision.worker")


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
            sc_compression=settings.worker.sc_compression,
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
