"""The intended-use gate's header rules: patient age in every form real files carry, view, body part,
modality; the image check's threshold; the refuse / flag policies."""

import numpy as np
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag

from inference.intended_use import (
    GateReason,
    IntendedUse,
    Policy,
    Population,
    parse_age_string,
    parse_date,
    patient_age_years,
)
from inference.sample_dicom import wrap_image

PIXELS = np.arange(64 * 64, dtype=np.uint8).reshape(64, 64)
CHILDREN = IntendedUse((Population(1.0, 6.0),), image_check_threshold=30.0)


def chest(**header) -> object:
    dataset = wrap_image(PIXELS)
    for keyword, value in header.items():
        setattr(dataset, keyword, value)
    return dataset


@pytest.mark.parametrize(
    ("text", "years"),
    [
        ("058Y", 58.0),
        ("58", 58.0),
        ("5 Y", 5.0),
        ("005M", 5 / 12),
        ("003W", 21 / 365.25),
        ("010D", 10 / 365.25),
        ("058y", 58.0),
        ("3 years", 3.0),
        (" 4Y ", 4.0),
        ("", None),
        ("Y", None),
        ("-3Y", None),
        ("abc", None),
        ("999Y", None),
        ("12.5Y", None),
    ],
)
def test_age_strings_in_the_forms_real_files_carry(text: str, years: float | None) -> None:
    assert parse_age_string(text) == (pytest.approx(years) if years is not None else None)


@pytest.mark.parametrize(
    ("text", "valid"),
    [("20240131", True), ("2024.01.31", True), ("2024-01-31", True), ("20241331", False), ("", False), ("2024", False)],
)
def test_dates(text: str, valid: bool) -> None:
    assert (parse_date(text) is not None) is valid


def test_age_from_birth_date_and_the_first_examination_date() -> None:
    dataset = chest(PatientBirthDate="20200115", StudyDate="20230115")
    assert patient_age_years(dataset) == pytest.approx(3.0, abs=0.01)
    del dataset.StudyDate
    dataset.AcquisitionDate = "20210115"
    dataset.SeriesDate = dataset.ContentDate = ""
    assert patient_age_years(dataset) == pytest.approx(1.0, abs=0.01)


def test_patient_age_wins_over_the_birth_date() -> None:
    assert patient_age_years(chest(PatientAge="004Y", PatientBirthDate="19500101", StudyDate="20240101")) == 4.0


@pytest.mark.parametrize(
    "header",
    [
        {"PatientBirthDate": "20250101", "StudyDate": "20240101"},  # born after the study
        {"PatientBirthDate": "20200101", "StudyDate": "", "SeriesDate": "", "ContentDate": ""},  # no reference date
        {"PatientBirthDate": "garbage", "StudyDate": "20240101"},
        {"PatientAge": "", "PatientBirthDate": ""},
    ],
)
def test_impossible_or_missing_ages_are_unknown(header: dict) -> None:
    assert patient_age_years(chest(**header)) is None


def test_an_unreadable_age_element_is_unknown_not_an_error() -> None:
    dataset = chest()
    # Patient's Age with a value no AS parser accepts, as raw bytes of the wrong length
    dataset[Tag(0x0010, 0x1010)] = RawDataElement(Tag(0x0010, 0x1010), "AS", 7, b"\xff\xfe58Y\x00\x01", 0, True, True)
    assert patient_age_years(dataset) is None


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        ({}, None),
        ({"PatientAge": "004Y"}, None),
        ({"PatientAge": "058Y"}, GateReason.AGE),
        ({"PatientAge": "58"}, GateReason.AGE),
        ({"PatientAge": "006Y"}, GateReason.AGE),  # the range is 1 to under 6 years
        ({"PatientAge": "005M"}, GateReason.AGE),
        ({"PatientAge": "012M"}, None),
        ({"PatientBirthDate": "19660101", "StudyDate": "20240101"}, GateReason.AGE),
        ({"PatientBirthDate": "20210101", "StudyDate": "20240101"}, None),
        ({"ViewPosition": "LL"}, GateReason.VIEW),
        ({"BodyPartExamined": "KNEE"}, GateReason.BODY_PART),
        ({"Modality": "MR"}, GateReason.MODALITY),
    ],
)
def test_header_rules(header: dict, reason: GateReason | None) -> None:
    verdict = CHILDREN.header_verdict(chest(**header))
    assert (verdict.reason if verdict else None) == reason
    if verdict is not None:
        assert verdict.text and len(verdict.text) <= 64  # it becomes an SR code meaning


def test_view_and_body_part_texts() -> None:
    assert CHILDREN.header_verdict(chest(ViewPosition="LL")).text == "lateral view (ViewPosition LL)"
    assert CHILDREN.header_verdict(chest(BodyPartExamined="KNEE")).text == "body part KNEE is not the chest"
    assert "58 years" in CHILDREN.header_verdict(chest(PatientAge="058Y")).text


def test_secondary_capture_needs_chest_hints() -> None:
    assert CHILDREN.header_verdict(wrap_image(PIXELS, sop_class="SC")) is None
    no_hint = wrap_image(PIXELS, sop_class="SC", body_part="")
    assert CHILDREN.header_verdict(no_hint).reason is GateReason.MODALITY
    no_hint.StudyDescription = "XR CHEST 1 VIEW"
    assert CHILDREN.header_verdict(no_hint) is None


def test_image_check_threshold_and_policies() -> None:
    assert CHILDREN.image_verdict(29.9) is None
    assert CHILDREN.image_verdict(30.1).reason is GateReason.IMAGE_CHECK
    assert CHILDREN.image_verdict(None) is None
    assert IntendedUse((Population(1, 6),), None).image_verdict(1e9) is None  # weights without an image check
    verdict = CHILDREN.image_verdict(50.0)
    assert CHILDREN.refuses(verdict) and not CHILDREN.refuses(None)
    assert not IntendedUse((Population(1, 6),), 30.0, Policy.FLAG).refuses(verdict)
    assert CHILDREN.verdict(None, 50.0) == verdict
    header = CHILDREN.header_verdict(chest(ViewPosition="LL"))
    assert CHILDREN.verdict(header, 50.0) == header  # the header's reason comes first


TWO = IntendedUse((Population(1.0, 6.0, "children"), Population(18.0, 90.0, "adults")), image_check_threshold=30.0)


@pytest.mark.parametrize(
    ("header", "population", "reason"),
    [
        ({"PatientAge": "004Y"}, "children", None),
        ({"PatientAge": "012M"}, "children", None),
        ({"PatientAge": "040Y"}, "adults", None),
        ({"PatientAge": "018Y"}, "adults", None),
        ({"PatientBirthDate": "19700101", "StudyDate": "20240101"}, "adults", None),
        ({"PatientAge": "010Y"}, None, GateReason.AGE),  # between the populations
        ({"PatientAge": "006Y"}, None, GateReason.AGE),
        ({"PatientAge": "006M"}, None, GateReason.AGE),  # younger than the children
        ({"PatientAge": "095Y"}, None, GateReason.AGE),  # older than the adults' maximum
        ({}, None, None),  # no age: the image check chooses the population
        ({"PatientAge": "040Y", "ViewPosition": "LL"}, "adults", GateReason.VIEW),
    ],
)
def test_the_header_age_chooses_the_population(header: dict, population: str | None, reason: GateReason | None) -> None:
    reading = TWO.read_header(chest(**header))
    assert reading.population == population and TWO.header_population(chest(**header)) == population
    assert (reading.verdict.reason if reading.verdict else None) == reason
    if reading.verdict is not None:
        assert len(reading.verdict.text) <= 64  # it becomes an SR code meaning


def test_an_age_in_no_population_names_the_ranges_and_no_header_decides_nothing() -> None:
    assert (
        TWO.header_verdict(chest(PatientAge="010Y")).text
        == "patient age 10 years, populations 1 to <6, 18 to <90 years"
    )
    assert (
        CHILDREN.header_verdict(chest(PatientAge="058Y")).text
        == "patient age 58 years, model's population 1 to <6 years"
    )
    assert TWO.read_header(None).verdict is None and TWO.read_header(None).population is None  # JPEG, PNG


def test_the_site_settings_are_outer_bounds_that_only_narrow() -> None:
    from dataclasses import replace

    narrowed = replace(TWO, min_age_years=2.0, max_age_years=65.0)
    assert narrowed.header_verdict(chest(PatientAge="018M")).text == "patient age 18 months, site allows 2 to <65 years"
    assert narrowed.header_verdict(chest(PatientAge="070Y")).reason is GateReason.AGE
    assert narrowed.header_verdict(chest(PatientAge="040Y")) is None
    assert narrowed.header_verdict(chest(PatientAge="010Y")).reason is GateReason.AGE  # still in no population
    wide = replace(TWO, min_age_years=0.0, max_age_years=120.0)  # bounds never widen a population
    assert wide.header_verdict(chest(PatientAge="095Y")).reason is GateReason.AGE
    assert (
        replace(TWO, min_age_years=3.0).header_verdict(chest(PatientAge="002Y")).text
        == "patient age 2 years, site allows 3 years and older"
    )
