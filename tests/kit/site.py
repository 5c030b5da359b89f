"""A site (store, outbox, audit trail) seeded with real analysed studies, for the web and HL7 tests."""

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from pydicom.uid import generate_uid

from common import audit
from common.results import DeliveryStatus, Finding, StudyStatus
from common.store import Store, StudyResult
from config.settings import Settings
from inference.classifier import load_classifier
from inference.sample_dicom import wrap_image, write_dataset
from tests.kit.data import chest_pixels
from tests.kit.pipeline import run_pipeline
from tests.kit.records import study_result
from tests.kit.worker import embedded_settings, make_message

TOKEN = "test-secret-token"


@dataclass
class Seeded:
    """One seeded study: what the test set, and the patient identity only its DICOM header holds."""

    study_uid: str
    accession: str
    finding: Finding
    probability: float | None
    status: str  # the worklist's
    patient_name: str
    patient_id: str


@dataclass
class Site:
    settings: Settings
    store: Store
    studies: dict[str, Seeded]


def seed(root: Path) -> Site:
    """Four analysed studies with real SC/SR files (the model ran; the rows' finding and probability
    are then set by the test, to know the expected order), one 'analysing' and one only received."""
    settings = embedded_settings(
        root,
        web={"auth_token": TOKEN, "refresh_s": 0},
        destinations=[{"name": "pacs", "kind": "folder", "path": str(root / "out")}],
    )
    audit.configure(settings.audit.path)
    store = Store(settings.store.url)
    classifier = load_classifier(None)
    start = datetime(2026, 11, 25, 8, 0, tzinfo=UTC)
    plan = [  # accession, finding, probability, delivery status, minutes after start
        ("ACC-NEG", Finding.NEGATIVE, 0.020, DeliveryStatus.DELIVERED, 0),
        ("ACC-POS-LOW", Finding.POSITIVE, 0.410, DeliveryStatus.DELIVERED, 5),
        ("ACC-POS-HIGH", Finding.POSITIVE, 0.930, DeliveryStatus.DELIVERED, 10),
        ("ACC-FAILED", Finding.POSITIVE, 0.410, DeliveryStatus.FAILED, 15),
    ]
    studies: dict[str, Seeded] = {}
    (root / "in").mkdir(parents=True, exist_ok=True)
    for index, (accession, finding, probability, status, minutes) in enumerate(plan):
        study_uid = generate_uid()
        name, patient_id = f"Doe^Patient{index}", f"PID-SECRET-{index}"
        dataset = wrap_image(chest_pixels(), study_uid=study_uid, patient_name=name, patient_id=patient_id)
        dataset.AccessionNumber = accession
        path = write_dataset(dataset, root / "in" / f"{accession}.dcm")
        message = make_message([path])
        outcome = run_pipeline(message, classifier, Path(settings.worker.outbox_dir))
        positive = finding is Finding.POSITIVE
        images = [
            image.model_copy(update={"probability": probability, "positive": positive}) for image in outcome.images
        ]
        received = start + timedelta(minutes=minutes)
        store.save_result(
            StudyResult(
                message_id=message.message_id,
                study_instance_uid=study_uid,
                round=1,
                calling_ae="CR_ROOM1",
                modality="CR",
                accession_number=accession,
                status=StudyStatus.ANALYSED,
                finding=finding,
                probability=probability,
                threshold=classifier.card.threshold,
                model_version=classifier.version,
                model_sha256=classifier.card.weights_sha256,
                images=images,
                timings_ms=outcome.timings_ms,
                received_at=received,
                analysed_at=received + timedelta(seconds=20),
            )
        )
        delivered = status is DeliveryStatus.DELIVERED
        store.update_delivery(
            message.message_id,
            "pacs",
            status=status,
            attempts=1 if delivered else 5,
            error=None if delivered else "association rejected",
        )
        audit.record(
            "analysed",
            message_id=message.message_id,
            study_uid=study_uid,
            finding=finding,
            probability=probability,
            model_sha256=classifier.card.weights_sha256,
            duration_ms=850.0,
            inference_ms=120.0,
        )
        studies[accession] = Seeded(study_uid, accession, finding, probability, status, name, patient_id)
    analysing_uid = generate_uid()
    store.save_result(
        study_result(
            generate_uid(),
            study_instance_uid=analysing_uid,
            calling_ae="DX_ROOM2",
            threshold=classifier.card.threshold,
            model_version=classifier.version,
            model_sha256=classifier.card.weights_sha256,
            received_at=start,
        )
    )
    studies["analysing"] = Seeded(analysing_uid, "", Finding.PENDING, None, "analysing", "", "")
    received_uid = generate_uid()
    audit.record("received", study_uid=received_uid, sop_instance_uid=generate_uid(), calling_ae="CR_ROOM1")
    studies["received"] = Seeded(received_uid, "", Finding.PENDING, None, "received", "", "")
    audit.configure(None)
    return Site(settings, store, studies)
