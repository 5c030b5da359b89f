"""Record — each outcome the worker reaches is kept in three places: a row in the outcome store
(common/store.py), an event in the audit trail and a line in the log (none holds patient data). Each
outcome has one function here that writes all three: a study round analysed or failed, a delivery
sent, retried or given up, an HL7 result sent, retried or given up. The store row of a study round is
built in one place, :func:`study_result`.

The model and the analysis are named for their types only: this module imports no model code, so a
deliverer (worker/result_tasks.py) records its outcomes without loading torch."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from common import audit
from common.dead_letters import AnalysisJob, DeadLetter, DeadLetters, DeliveryJob, new_dead_letter
from common.messages import StudyReady
from common.results import DeliveryStatus, Finding, ImageResult, StudyStatus
from common.store import Store, StudyResult
from worker.hl7_result import Hl7Job

if TYPE_CHECKING:  # types only (see above)
    from inference.classifier import Classifier
    from inference.site_profile import OperatingPoint
    from worker.pipeline import StudyOutcome

log = logging.getLogger("lungvision.worker")
MODEL_UNAVAILABLE = "unavailable"  # model version of a failed round when the model itself could not be loaded
AUDITED_REASON_CHARS = 300  # a delivery's error in the audit trail (the store keeps 512)


@dataclass(frozen=True)
class Model:
    """The model an outcome names."""

    version: str
    sha256: str
    point: OperatingPoint | None  # the first population's; None: the model could not be loaded

    @classmethod
    def of(cls, classifier: Classifier | None) -> Model:
        """``classifier``'s identity; None when loading the model was what failed."""
        if classifier is None:
            return cls(MODEL_UNAVAILABLE, "", None)
        return cls(classifier.version, classifier.card.weights_sha256, classifier.operating_point)

    def point_for(self, analysis: StudyOutcome | None) -> OperatingPoint | None:
        """The operating point a round is shown at: its finding's image's population's; with no finding,
        the first population's."""
        return (analysis.operating_point if analysis is not None else None) or self.point


def study_result(
    ready: StudyReady, model: Model, *, analysis: StudyOutcome | None = None, failure: str | None = None
) -> StudyResult:
    """The store row of a study round: analysed (``analysis``), failed (``failure``: why), else analysing."""
    point = model.point_for(analysis)
    if analysis is not None:
        status, finding, images = analysis.status, analysis.finding, analysis.images
    elif failure is not None:
        status, finding, images = StudyStatus.FAILED, Finding.NOT_ANALYSED, [ImageResult(error=failure)]
    else:
        status, finding, images = StudyStatus.ANALYSING, Finding.PENDING, []
    return StudyResult(
        message_id=ready.message_id,
        study_instance_uid=ready.study_instance_uid,
        round=ready.round,
        calling_ae=ready.calling_ae,
        modality=analysis.modality if analysis else None,
        accession_number=analysis.accession_number if analysis else None,
        status=status,
        finding=finding,
        probability=analysis.probability if analysis else None,
        threshold=point.threshold if point else 0.0,
        model_version=model.version,
        model_sha256=model.sha256,
        images=images,
        timings_ms=analysis.timings_ms if analysis else {},
        received_at=ready.first_received_at,
    )


def record_analysed(
    store: Store,
    ready: StudyReady,
    model: Model,
    analysis: StudyOutcome,
    destinations: list[str],
    *,
    shadow_mode: bool,
    started: float,
) -> None:
    """An analysed round (findings, or why none): its row with a pending delivery per destination, an
    "analysed" event (finding, model, gate counts, outputs, timings; ``started``: the analysis's
    ``time.perf_counter()``) and an info line."""
    result = study_result(ready, model, analysis=analysis)
    store.save_outcome(result, destinations)
    point = model.point_for(analysis)
    assert point is not None  # a round was analysed, so the model was loaded
    audit.record(
        "analysed",
        message_id=ready.message_id,
        study_uid=ready.study_instance_uid,
        round=ready.round,
        calling_ae=ready.calling_ae,
        finding=analysis.finding,
        probability=result.probability,
        model_version=model.version,
        model_sha256=model.sha256,
        status=analysis.status,
        operating_point=point.name,
        outside_intended_use=analysis.gate_counts(),
        shadow_mode=shadow_mode,
        instances=[image.sop_instance_uid for image in analysis.images],
        outputs=analysis.output_uids,
        destinations=destinations,
        duration_ms=round((time.perf_counter() - started) * 1000, 1),
        inference_ms=round(analysis.timings_ms.get("model_heatmap", 0.0), 1),
    )
    log.info(
        "study round %s analysed: %s (%d images, %d outputs) → %s",
        ready.message_id,
        analysis.finding,
        len(analysis.findings),
        len(analysis.files),
        ", ".join(destinations) or "no destination",
    )


def record_analysis_failure(
    store: Store, ready: StudyReady, model: Model, reason: str, error: BaseException | None = None
) -> DeadLetter | None:
    """A round whose analysis failed: its row (failed, with ``reason``) and a dead letter to replay it,
    a "failed" event and an error line — unless another attempt already recorded a final outcome (None,
    and a warning line). If the store itself fails here, the exception propagates and the sweeper sends
    the round again later."""
    job = AnalysisJob(ready.message_id, ready.study_instance_uid, ready.model_dump(mode="json"))
    letter = new_dead_letter(job, reason, attempts=1)
    if not store.record_failure(study_result(ready, model, failure=reason), letter.id, letter.to_json()):
        log.warning(
            "study round %s: an analysis attempt failed (%s), but another one recorded the outcome; kept it",
            ready.message_id,
            reason,
        )
        return None
    audit.record(
        "failed",
        stage="analysis",
        message_id=ready.message_id,
        study_uid=ready.study_instance_uid,
        round=ready.round,
        model_sha256=model.sha256 or None,
        outcome=reason,
        final=True,
        dead_letter=letter.id,
    )
    # with the traceback: lungvision.logfilter keeps its frames and redacts the exception's message
    log.error(
        "study round %s: analysis failed, recorded as failed and dead-lettered as %s: %s",
        ready.message_id,
        letter.id,
        reason,
        exc_info=error,
    )
    return letter


def record_delivery(
    store: Store,
    job: DeliveryJob,
    status: DeliveryStatus,
    attempt: int,
    *,
    reason: str | None = None,
    retry_in_s: float | None = None,
) -> None:
    """One attempt to send a round's files to one destination: delivered, retrying (in ``retry_in_s``) or
    failed for good (dead-lettered with ``reason``) — the delivery's row, a "delivered" or "failed" event
    and a log line."""
    letter = None
    if status is DeliveryStatus.FAILED:
        assert reason is not None  # a failure says why
        letter = DeadLetters(store).add(new_dead_letter(job, reason, attempt))
    store.update_delivery(job.message_id, job.destination, status=status, attempts=attempt, error=reason)
    result = store.result(job.message_id)
    event = dict(
        message_id=job.message_id,
        study_uid=job.study_instance_uid,
        destination=job.destination,
        attempts=attempt,
        model_sha256=None if result is None else result.model_sha256,
    )
    if status is DeliveryStatus.DELIVERED:
        audit.record("delivered", **event, outcome="success", outputs=[Path(name).stem for name in job.files])
        log.info(
            "delivered %s to %s (%d objects, attempt %d)", job.message_id, job.destination, len(job.files), attempt
        )
    elif status is DeliveryStatus.RETRYING:
        assert reason is not None and retry_in_s is not None  # a retry says why and when
        audit.record(
            "failed",
            stage="delivery",
            **event,
            outcome=reason[:AUDITED_REASON_CHARS],
            final=False,
            retry_in_s=round(retry_in_s, 1),
        )
        log.warning(
            "delivery of %s to %s failed (attempt %d), retry in %.0f s: %s",
            job.message_id,
            job.destination,
            attempt,
            retry_in_s,
            reason,
        )
    else:
        assert reason is not None and letter is not None  # failed for good: dead-lettered above
        audit.record(
            "failed",
            stage="delivery",
            **event,
            outcome=reason[:AUDITED_REASON_CHARS],
            final=True,
            dead_letter=letter.id,
        )
        log.error(
            "delivery of %s to %s dead-lettered as %s after %d attempt(s): %s",
            job.message_id,
            job.destination,
            letter.id,
            attempt,
            reason,
        )


def record_hl7(
    job: Hl7Job, attempt: int, *, reason: str | None = None, final: bool = True, retry_in_s: float | None = None
) -> None:
    """One attempt to send a round's ORU^R01 to one endpoint: sent (no ``reason``), retrying or given up —
    a "delivered" or "failed" event and a log line (HL7 results have no row of their own)."""
    event = dict(
        message_id=job.message_id,
        study_uid=job.study_instance_uid,
        destination=f"hl7:{job.endpoint}",
        attempts=attempt,
        model_sha256=job.model_sha256,
    )
    if reason is None:
        audit.record("delivered", **event, outcome="ACK AA", finding=job.finding)
        log.info("HL7 result of %s sent to %s (attempt %d)", job.message_id, job.endpoint, attempt)
        return
    audit.record("failed", stage="hl7", **event, outcome=reason[:AUDITED_REASON_CHARS], final=final)
    if final:
        log.error(
            "HL7 result of %s to %s given up after %d attempt(s): %s", job.message_id, job.endpoint, attempt, reason
        )
    else:
        log.warning(
            "HL7 result of %s to %s failed (attempt %d), retry in %.0f s: %s",
            job.message_id,
            job.endpoint,
            attempt,
            retry_in_s,
            reason,
        )
