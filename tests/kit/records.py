"""Records a test makes by hand, with plain values it overrides where they matter: a study round as the
store holds it, and a site profile."""

from datetime import UTC, datetime

from common.results import Finding, StudyStatus
from common.store import StudyResult
from inference.site_profile import SiteProfile


def study_result(message_id: str, **fields: object) -> StudyResult:
    """Round ``message_id`` of study 1.2.3, received now and being analysed (no finding, no images yet);
    ``fields`` set what the test needs."""
    values = {
        "message_id": message_id,
        "study_instance_uid": "1.2.3",
        "round": 1,
        "calling_ae": "AE",
        "modality": None,
        "accession_number": None,
        "status": StudyStatus.ANALYSING,
        "finding": Finding.PENDING,
        "probability": None,
        "threshold": 0.5,
        "model_version": "m 1",
        "model_sha256": "ab" * 32,
        "images": [],
        "timings_ms": {},
        "received_at": datetime.now(UTC),
    }
    return StudyResult(**{**values, **fields})


def site_profile(weights_sha256: str, **fields: object) -> SiteProfile:
    """Site profile "test-site" for the weights ``weights_sha256``: one point (threshold 0.5, temperature
    1.5) for every population, from 200 positives and 100 negatives; ``fields`` set what the test needs."""
    values = {
        "id": "test-site",
        "threshold": 0.5,
        "temperature": 1.5,
        "target_sensitivity": 0.98,
        "confidence": 0.95,
        "target_met": True,
        "weights_sha256": weights_sha256,
        "model_version": "x",
        "created": "2026-11-30",
        "data": "test",
        "n": {"positive": 200, "negative": 100, "refused": 0},
    }
    return SiteProfile(**{**values, **fields})
