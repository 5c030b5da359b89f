"""The JSON API's answers and requests (pydantic models, shown in the OpenAPI schema at /docs)."""

from datetime import datetime

from pydantic import BaseModel

from common import results
from common.results import DeliveryStatus, Finding, Verdict
from web.worklist import WorklistStatus


class PatientFields(BaseModel):
    """Only in answers to authenticated requests."""

    patient_name: str
    patient_id: str
    patient_birth_date: str


class StudySummary(BaseModel):
    study_instance_uid: str
    status: WorklistStatus
    finding: Finding
    probability: float | None
    threshold: float | None
    arrival_time: datetime
    accession_number: str | None
    modality: str | None
    calling_ae: str | None
    message_id: str | None
    round: int | None
    thumbnail_url: str | None
    detail_url: str
    review: Verdict | None = None  # the current reviewer verdict on this round's finding
    outside_intended_use: bool = False  # any image of the round is outside the intended use
    population: str | None = None  # the population of the study's finding, e.g. children (None: none)
    operating_point: str | None = None  # the operating point it was judged at, e.g. "shipped / adults"
    patient: PatientFields | None = None


class ImageResult(results.ImageResult):
    """One image of a round as stored (common.results.ImageResult), with the URL of its heatmap picture."""

    image_url: str | None = None


class DeliveryEntry(BaseModel):
    destination: str
    status: DeliveryStatus
    attempts: int
    last_error: str | None
    updated_at: datetime | None


class StudyDetail(StudySummary):
    model_version: str | None
    model_sha256: str | None
    timings_ms: dict[str, float]
    images: list[ImageResult]
    deliveries: list[DeliveryEntry]
    events: list[dict]
    sr_summary: list[str]


class ReviewRequest(BaseModel):
    verdict: Verdict


class ReviewAnswer(BaseModel):
    study_instance_uid: str
    message_id: str
    verdict: Verdict


class DeadLetterEntry(BaseModel):
    id: str
    message_id: str
    study_instance_uid: str
    destination: str
    attempts: int
    error: str
    failed_at: str


class ReplayAnswer(BaseModel):
    replayed: str  # the dead letter's id


class ErrorMessage(BaseModel):
    """Every error answer of the API, including request validation (422)."""

    detail: str


def errors(**descriptions: str) -> dict:
    """OpenAPI ``responses`` for error statuses given as ``e401="…"``: each answers an ErrorMessage."""
    return {int(code[1:]): {"model": ErrorMessage, "description": text} for code, text in descriptions.items()}
