"""Studies as the API and the pages show them (summary, detail), and a reviewer's verdict on one. Patient
fields are read from result headers per request, only for authenticated requests, and never logged."""

import logging

from fastapi import HTTPException

from common import audit
from common.results import Verdict
from web.context import WebContext
from web.schemas import DeliveryEntry, ImageResult, PatientFields, ReviewAnswer, StudyDetail, StudySummary
from web.worklist import StudyRow, patient_fields, sr_summary

log = logging.getLogger("lungvision.web")


def summary(context: WebContext, row: StudyRow, authenticated: bool) -> StudySummary:
    uid = row.study_instance_uid
    patient = patient_fields(context.settings.worker.outbox_dir, row.result) if authenticated else None
    return StudySummary(
        study_instance_uid=uid,
        status=row.status,
        finding=row.finding,
        probability=row.probability,
        threshold=row.threshold,
        arrival_time=row.arrival_time,
        accession_number=row.accession_number,
        modality=row.modality,
        calling_ae=row.calling_ae,
        message_id=row.message_id,
        round=row.round,
        thumbnail_url=f"/studies/{uid}/thumbnail.png" if row.has_heatmap else None,
        detail_url=f"/studies/{uid}",
        review=row.review,
        outside_intended_use=row.outside_intended_use,
        population=row.population,
        operating_point=row.operating_point,
        patient=PatientFields(**patient) if patient else None,
    )


def detail(context: WebContext, row: StudyRow, authenticated: bool) -> StudyDetail:
    result = row.result
    images, deliveries, lines = [], [], []
    if result is not None:
        uid = result.study_instance_uid
        images = [
            ImageResult(
                **image.model_dump(exclude={"not_analysed_reason"}),
                not_analysed_reason=image.not_analysed_reason or image.error,
                image_url=f"/studies/{uid}/images/{image.sc_uid}.png" if image.sc_uid else None,
            )
            for image in result.images or []
        ]
        deliveries = [
            DeliveryEntry(
                destination=d.destination,
                status=d.status,
                attempts=d.attempts,
                last_error=d.last_error,
                updated_at=d.updated_at,
            )
            for d in context.store.deliveries(result.message_id)
        ]
        sr_uid = next((image.sr_uid for image in images if image.sr_uid and image.sc_uid), None) or next(
            (image.sr_uid for image in images if image.sr_uid), None
        )
        lines = sr_summary(context.worklist.output_path(uid, sr_uid)) if sr_uid else []
    return StudyDetail(
        **summary(context, row, authenticated).model_dump(),
        model_version=result.model_version if result else None,
        model_sha256=result.model_sha256 if result else None,
        timings_ms=result.timings_ms or {} if result else {},
        images=images,
        deliveries=deliveries,
        events=context.worklist.events(row.study_instance_uid),
        sr_summary=lines,
    )


def review(context: WebContext, study_uid: str, verdict: Verdict) -> ReviewAnswer:
    """Record ``verdict`` on the finding of the study's latest round, and audit it."""
    result = context.row(study_uid).result
    if result is None:
        raise HTTPException(409, "the study has not been analysed yet")
    try:
        stored = context.store.save_review(result, verdict, context.settings.web.auth_user)
    except ValueError as error:  # no POSITIVE or NEGATIVE finding to agree or disagree with
        raise HTTPException(409, str(error)) from error
    audit.record(
        "reviewed",
        message_id=result.message_id,
        study_uid=result.study_instance_uid,
        verdict=stored.verdict.value,
        finding=stored.finding,
        model_sha256=stored.model_sha256,
    )
    log.info("study round %s reviewed from the web: %s %s", result.message_id, stored.verdict.value, stored.finding)
    return ReviewAnswer(
        study_instance_uid=result.study_instance_uid, message_id=result.message_id, verdict=stored.verdict
    )
