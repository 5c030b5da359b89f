"""The findings SR on its own: synthetic source images and a heatmap SC become a Comprehensive SR
holding a TID 1500 Measurement Report that says what the model said, refers to every image it
names in its evidence, reads back with highdicom and passes dciodvfy; findings it cannot report
are refused with a clear error."""

import highdicom as hd
import numpy as np
import pytest
from pydicom import Dataset, dcmread
from pydicom.uid import generate_uid

from inference.intended_use import GateReason, GateVerdict
from inference.sample_dicom import wrap_image
from tests.kit.dicom_checks import COMPREHENSIVE_SR_CLASS, dciodvfy_errors, sr_values
from worker.encode.equipment import Algorithm
from worker.encode.findings_sr import (
    CHEST_XRAY,
    NOT_ANALYSED,
    PNEUMONIA,
    PNEUMONIA_PROBABILITY,
    STUDY_LEVEL,
    ImageFinding,
    build_findings_sr,
)
from worker.encode.heatmap_sc import build_heatmap_sc
from worker.pipeline import study_finding, write_outputs

ALGORITHM = Algorithm("lungvision-resnet18", "1.0.0", "cd" * 32)
DEVICE_UID = "1.2.826.0.1.3680043.8.498.1"
THRESHOLD, POINT = 0.42, "shipped / adults"


@pytest.fixture
def study() -> dict[str, ImageFinding]:
    """A frontal image analysed (positive, with its heatmap SC) and a lateral one the gate refused."""
    study_uid = generate_uid()
    pixels = np.add.outer(np.arange(64), np.arange(48)).astype(np.uint8)
    frontal = wrap_image(pixels, study_uid=study_uid, patient_name="Sr^Test", patient_id="SR-1")
    lateral = wrap_image(pixels, study_uid=study_uid, view_position="LL", patient_name="Sr^Test", patient_id="SR-1")
    sc = build_heatmap_sc(
        frontal,
        np.zeros((64, 48, 3), np.uint8),
        algorithm=ALGORITHM,
        series_instance_uid=generate_uid(),
        sop_instance_uid=generate_uid(),
        series_number=9901,
        instance_number=1,
    )
    return {
        "frontal": ImageFinding(frontal, probability=0.8312, positive=True, heatmap_sc=sc, logit=1.7),
        "lateral": ImageFinding(
            lateral,
            not_analysed_reason="lateral view (ViewPosition LL)",
            gate=GateVerdict(GateReason.VIEW, "lateral view (ViewPosition LL)"),
        ),
    }


def build(findings, top):
    return build_findings_sr(
        findings,
        study_finding=top,
        threshold=THRESHOLD,
        operating_point=POINT,
        algorithm=ALGORITHM,
        device_uid=DEVICE_UID,
        series_instance_uid=generate_uid(),
        sop_instance_uid=generate_uid(),
        series_number=9902,
        instance_number=1,
    )


def code(item) -> tuple[str, str]:
    concept = item.ConceptNameCodeSequence[0]
    return concept.CodeValue, concept.CodingSchemeDesignator


def children(item, value: str, scheme: str = "DCM") -> list[Dataset]:
    return [child for child in item.ContentSequence if code(child) == (value, scheme)]


def image_references(items) -> set[str]:
    """SOP Instance UIDs of every IMAGE item in a content tree."""
    found = set()
    for item in items:
        if item.ValueType == "IMAGE":
            found.add(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        found |= image_references(item.get("ContentSequence", []))
    return found


def evidence(sr) -> set[str]:
    return {
        instance.ReferencedSOPInstanceUID
        for study_item in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study_item.ReferencedSeriesSequence
        for instance in series.ReferencedSOPSequence
    }


def test_sr_is_a_tid_1500_measurement_report_in_the_source_study(study) -> None:
    frontal = study["frontal"]
    sr = build([frontal], frontal)
    assert sr.SOPClassUID == COMPREHENSIVE_SR_CLASS and sr.Modality == "SR"
    assert sr.StudyInstanceUID == frontal.source.StudyInstanceUID and sr.PatientID == "SR-1"
    assert (sr.CompletionFlag, sr.VerificationFlag, sr.PreliminaryFlag) == ("COMPLETE", "UNVERIFIED", "PRELIMINARY")
    assert code(sr) == ("126000", "DCM")  # Imaging Measurement Report
    template = sr.ContentTemplateSequence[0]
    assert (template.MappingResource, template.TemplateIdentifier) == ("DCMR", "1500")
    (procedure,) = children(sr, "121058")  # Procedure reported
    assert procedure.ConceptCodeSequence[0].CodeValue == CHEST_XRAY.value
    (observer_uid,) = [item for item in sr.ContentSequence if code(item) == ("121012", "DCM")]
    assert observer_uid.UID == DEVICE_UID  # the device observer: Lung Vision
    (measurements,) = children(sr, "126010")  # Imaging Measurements
    study_group, image_group = children(measurements, "125007")  # Measurement Groups: the study's first
    assert [item.ConceptCodeSequence[0].CodeValue for item in children(study_group, "276214006", "SCT")] == [
        STUDY_LEVEL.value
    ]  # Finding category
    assert [item.ConceptCodeSequence[0].CodeValue for item in children(image_group, "121071")] == [PNEUMONIA.value]
    assert sr.content[0].ContentSequence == sr.ContentSequence  # highdicom's view holds the whole tree


def test_sr_says_finding_probability_threshold_and_operating_point(study) -> None:
    frontal = study["frontal"]
    values = sr_values(build([frontal], frontal))
    assert values["Pneumonia"] == ["Present", "Present"]  # the study's finding, then the image's
    assert values[PNEUMONIA_PROBABILITY.meaning] == [pytest.approx(0.8312), pytest.approx(0.8312)]
    assert values["Decision threshold"] == [pytest.approx(THRESHOLD)]
    assert f"operating point {POINT} (threshold {THRESHOLD:.4f})" in values["Algorithm Parameters"]
    assert f"weights sha256 {ALGORITHM.weights_sha256}" in values["Algorithm Parameters"]
    assert values["Algorithm Name"] == [ALGORITHM.name] * 2 and values["Algorithm Version"] == ["1.0.0"] * 2


def test_each_group_names_the_algorithm_once_for_its_measurements(study) -> None:
    """TID 1501: the group's algorithm (TID 4019) applies to its measurements; they do not repeat it."""
    frontal = study["frontal"]
    (measurements,) = children(build([frontal], frontal), "126010")
    for group in children(measurements, "125007"):
        assert len(children(group, "111001")) == 1  # Algorithm Name, in the group itself
        for measurement in (item for item in group.ContentSequence if item.ValueType == "NUM"):
            assert all(code(item) != ("111001", "DCM") for item in measurement.get("ContentSequence", []))


def test_an_image_not_analysed_says_why_and_names_the_gate_rule(study) -> None:
    lateral, frontal = study["lateral"], study["frontal"]
    values = sr_values(build([lateral], frontal))
    assert values[NOT_ANALYSED.meaning] == ["lateral view (ViewPosition LL)"]
    assert values["Outside intended use"] == ["Not a frontal view"]
    assert values[PNEUMONIA_PROBABILITY.meaning] == [pytest.approx(0.8312)]  # the study-level group only


def test_every_image_the_report_names_is_in_its_evidence(study) -> None:
    for findings in ([study["frontal"]], [study["lateral"]], [study["lateral"], study["frontal"]]):
        sr = build(findings, study_finding(findings))
        referenced = image_references(sr.ContentSequence)
        assert referenced and referenced == evidence(sr)
    assert study["frontal"].heatmap_sc.SOPInstanceUID in referenced


def test_written_sr_passes_dciodvfy_and_reads_back_as_tid_1500(study, tmp_path) -> None:
    frontal, lateral = study["frontal"], study["lateral"]
    paths = write_outputs([build([frontal], frontal), build([lateral], frontal)], tmp_path / "outbox")
    for path in paths:
        assert dciodvfy_errors(path) == [], path.name
    report = hd.sr.ComprehensiveSR.from_dataset(dcmread(paths[0])).content
    assert isinstance(report, hd.sr.MeasurementReport)
    groups = report.get_image_measurement_groups(finding_type=PNEUMONIA)
    assert [group.finding_category for group in groups][0].value == STUDY_LEVEL.value
    (probability,) = groups[1].get_measurements(name=PNEUMONIA_PROBABILITY)
    assert probability.value == pytest.approx(0.8312)


def test_findings_it_cannot_report_are_refused_with_a_reason(study) -> None:
    frontal, lateral = study["frontal"], study["lateral"]
    with pytest.raises(ValueError, match="at least one image"):
        build([], None)
    undecided = ImageFinding(frontal.source, probability=0.5, positive=None)
    with pytest.raises(ValueError, match="image 1 has a probability but no decision"):
        build([undecided], None)
    with pytest.raises(ValueError, match="study finding must be an analysed image"):
        build([lateral], lateral)
    del lateral.source.SOPInstanceUID
    with pytest.raises(ValueError, match="source image 1 has no SOPInstanceUID"):
        build([lateral], frontal)
    del frontal.heatmap_sc.SeriesInstanceUID
    with pytest.raises(ValueError, match="heatmap SC of image 1 has no SeriesInstanceUID"):
        build([frontal], None)
