"""Intake: each kind of payload → its named status; only good, new, foreign instances reach completion."""

from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from pynetdicom.sop_class import ComputedRadiographyImageStorage, CTImageStorage

from common.identity import MANUFACTURER, UID_ROOT
from common.spool import Spool
from dicom_node.intake import Disposition, Received, StoreStatus
from tests.kit.dicom_fixtures import make_image, raw_part10, save, truncated_copy


def received(path: Path, sop_uid: str, sop_class_uid: str = ComputedRadiographyImageStorage) -> Received:
    return Received(path, "MODALITY", sop_class_uid, sop_uid, "1.2.840.10008.1.2.1")


def write(spool: Spool, **image_options) -> tuple[Path, str]:
    dataset = make_image(**image_options)
    path = save(dataset, spool.receiving_dir / f"{generate_uid()}.dcm")
    return path, str(dataset.SOPInstanceUID)


def test_a_good_instance_is_spooled_and_starts_the_study_clock(intake, spool, tracker) -> None:
    path, sop_uid = write(spool, study_uid="1.2.3")
    outcome = intake.receive(received(path, sop_uid))
    assert (outcome.status, outcome.disposition, outcome.study_uid) == (
        StoreStatus.SUCCESS,
        Disposition.STORED,
        "1.2.3",
    )
    assert (spool.root / "studies" / "1.2.3" / "incoming" / f"{sop_uid}.dcm").exists()
    assert tracker.due(now=47.0) == [("1.2.3", 42.0)]


def test_a_duplicate_is_success_and_stored_once(intake, spool) -> None:
    first, sop_uid = write(spool, study_uid="1.2.3")
    intake.receive(received(first, sop_uid))
    again = save(make_image(study_uid="1.2.3", sop_uid=sop_uid), spool.receiving_dir / "again.dcm")
    outcome = intake.receive(received(again, sop_uid))
    assert (outcome.status, outcome.disposition) == (StoreStatus.SUCCESS, Disposition.DUPLICATE)
    assert len(list(spool.root.rglob(f"{sop_uid}.dcm"))) == 1


def test_other_storage_classes_are_acknowledged_and_discarded(intake, spool) -> None:
    path, sop_uid = write(spool, sop_class_uid=CTImageStorage)
    outcome = intake.receive(received(path, sop_uid, CTImageStorage))
    assert (outcome.status, outcome.disposition) == (StoreStatus.SUCCESS, Disposition.IGNORED_SOP_CLASS)
    assert not list((spool.root / "studies").iterdir())


def test_low_disk_answers_out_of_resources_and_recovers_when_space_returns(intake, spool) -> None:
    spool.min_free_bytes = spool.free_bytes() + 2**50
    path, sop_uid = write(spool)
    assert intake.receive(received(path, sop_uid)).status == StoreStatus.OUT_OF_RESOURCES
    spool.min_free_bytes = 0
    assert intake.receive(received(path, sop_uid)).status == StoreStatus.SUCCESS


def test_a_write_failure_answers_out_of_resources(intake, spool, monkeypatch) -> None:
    def failing_store(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(spool, "store", failing_store)
    path, sop_uid = write(spool)
    outcome = intake.receive(received(path, sop_uid))
    assert (outcome.status, outcome.disposition) == (StoreStatus.OUT_OF_RESOURCES, Disposition.WRITE_FAILED)
    assert "No space left" in outcome.detail


@pytest.mark.filterwarnings("ignore:Expected explicit VR")
@pytest.mark.parametrize("kind", ["empty", "garbage", "truncated-pixels", "truncated-header", "no-pixels"])
def test_unparseable_payloads_get_cannot_understand(intake, spool, kind: str) -> None:
    sop_uid = generate_uid()
    target = spool.receiving_dir / "payload.dcm"
    if kind in ("empty", "garbage"):
        body = b"" if kind == "empty" else bytes(range(256)) * 8
        raw_part10(target, body, sop_class_uid=ComputedRadiographyImageStorage, sop_uid=sop_uid)
    elif kind == "no-pixels":
        dataset = make_image(sop_uid=sop_uid)
        del dataset.PixelData
        save(dataset, target)
    else:
        full = save(make_image(sop_uid=sop_uid), spool.receiving_dir / "full.dcm")
        truncated_copy(full, target, drop_bytes=100 if kind == "truncated-pixels" else 8300)
    outcome = intake.receive(received(target, sop_uid))
    assert 0xC000 <= outcome.status <= 0xCFFF, outcome
    assert outcome.detail
    assert not list((spool.root / "studies").iterdir())


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI", "ignore:The value length")
@pytest.mark.parametrize(
    "uids",
    [
        {"study_uid": "../../x"},
        {"study_uid": ""},
        {"study_uid": "1." * 40 + "1"},
        {"series_uid": "1.2/../../x"},
        {"sop_uid": "../../../evil"},
    ],
)
def test_unsafe_uids_are_refused_and_nothing_is_written(intake, spool, tmp_path, uids: dict) -> None:
    dataset = make_image(**uids)
    path = save(dataset, spool.receiving_dir / "payload.dcm")
    outcome = intake.receive(received(path, str(dataset.SOPInstanceUID)))
    assert (outcome.status, outcome.disposition) == (StoreStatus.CANNOT_UNDERSTAND_UID, Disposition.INVALID_UID)
    assert not list((spool.root / "studies").iterdir())
    assert not list(tmp_path.parent.rglob("x")) and not list(tmp_path.parent.rglob("evil"))


def test_a_dataset_of_another_class_than_requested_does_not_match(intake, spool) -> None:
    path, sop_uid = write(spool, sop_class_uid=CTImageStorage)
    outcome = intake.receive(received(path, sop_uid, ComputedRadiographyImageStorage))
    assert outcome.status == StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS


@pytest.mark.parametrize(
    "marker", [{"sop_uid": UID_ROOT + "1.2"}, {"series_uid": UID_ROOT + "3"}, {"manufacturer": MANUFACTURER}]
)
def test_our_own_objects_are_stored_but_never_reach_completion(intake, spool, tracker, marker: dict) -> None:
    path, sop_uid = write(spool, study_uid="1.2.3", **marker)
    outcome = intake.receive(received(path, sop_uid))
    assert (outcome.status, outcome.disposition) == (StoreStatus.SUCCESS, Disposition.STORED_OWN_OBJECT)
    assert (spool.root / "studies" / "1.2.3" / "own" / f"{sop_uid}.dcm").exists()
    assert len(tracker) == 0


def test_deflated_payloads_are_read_and_truncated_ones_refused(intake, spool, tmp_path) -> None:
    dataset = make_image(study_uid="1.2.3")
    dataset.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1.99"  # deflated explicit VR little endian
    full = save(dataset, tmp_path / "deflated.dcm")
    truncated = truncated_copy(full, spool.receiving_dir / "truncated.dcm", drop_bytes=200)
    assert intake.receive(received(truncated, str(dataset.SOPInstanceUID))).status == StoreStatus.CANNOT_UNDERSTAND
    whole = full.rename(spool.receiving_dir / "whole.dcm")
    assert intake.receive(received(whole, str(dataset.SOPInstanceUID))).status == StoreStatus.SUCCESS


def test_failure_responses_carry_a_short_error_comment_and_success_none() -> None:
    from dicom_node.handlers import ERROR_COMMENT_MAX, store_response
    from dicom_node.intake import Outcome

    stored = store_response(Outcome(Disposition.STORED, "1.2.3"))
    assert stored.Status == 0x0000 and "ErrorComment" not in stored
    refused = store_response(Outcome(Disposition.INCOMPLETE_PIXEL_DATA, "1.2.3", "Pixel Data has 2 of 4 bytes"))
    assert (refused.Status, refused.ErrorComment) == (0xC000, "incomplete-pixel-data: Pixel Data has 2 of 4 bytes")
    long = store_response(Outcome(Disposition.UNREADABLE, detail="a\\b\nc " + "x" * 100))
    assert long.ErrorComment.startswith("unreadable: a/b c xxx") and len(long.ErrorComment) == ERROR_COMMENT_MAX
