"""UID checks (spool path safety) and loop-prevention identity — no network."""

import pytest

from common.identity import MANUFACTURER, UID_ROOT, is_lung_vision_object
from common.uids import InvalidUid, checked_uid, is_valid_uid


@pytest.mark.parametrize("value", ["1.2.840.10008.5.1.4.1.1.1", "2.25.1234567890", "1.2.03.4", "0"])
def test_plain_uids_pass_unchanged(value: str) -> None:
    assert checked_uid(value, "StudyInstanceUID") == value
    assert is_valid_uid(value)


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("../../x", "dot-separated digits"),
        ("1.2/../../x", "dot-separated digits"),
        ("1.2.3/", "dot-separated digits"),
        ("/etc/passwd", "dot-separated digits"),
        ("..", "dot-separated digits"),
        ("1..2", "dot-separated digits"),
        (".1.2", "dot-separated digits"),
        ("1.2.", "dot-separated digits"),
        ("1.2\x00.3", "dot-separated digits"),
        ("1.2 3", "dot-separated digits"),
        ("１.２", "dot-separated digits"),  # full-width digits are not ASCII digits
        ("", "empty"),
        ("1." * 40 + "1", "at most 64"),
        (None, "missing"),
        (["1.2", "1.3"], "missing or not a single value"),
    ],
)
def test_unsafe_uids_are_refused_with_a_reason(value: object, why: str) -> None:
    with pytest.raises(InvalidUid, match=why):
        checked_uid(value, "StudyInstanceUID")
    assert not is_valid_uid(value)


def test_own_objects_are_recognised_by_uid_root_series_or_manufacturer() -> None:
    foreign = {"sop_instance_uid": "1.2.3.4", "series_instance_uid": "1.2.3", "manufacturer": "ACME"}
    assert not is_lung_vision_object(**foreign)
    assert is_lung_vision_object(**{**foreign, "sop_instance_uid": UID_ROOT + "7.8"})
    assert is_lung_vision_object(**{**foreign, "series_instance_uid": UID_ROOT + "7"})
    assert is_lung_vision_object(**{**foreign, "manufacturer": MANUFACTURER})
    assert is_valid_uid(UID_ROOT + "1")
