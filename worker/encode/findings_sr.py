"""Findings SR — per-image model results become a Comprehensive SR holding a TID 1500 Measurement Report.

Content: one measurement group per source image (TID 1501) with the qualitative evaluation
"Pneumonia" (SNOMED CT 233604007) present/absent, the calibrated probability and the decision
threshold as measurements, the algorithm (TID 4019: name, version, weights sha256 as a parameter;
once per group, which its measurements inherit — repeated in the probability measurement it was ≈ a
seventh of the SR's elements and of its building and encoding time, issue 12) and references to the
source image and its heatmap SC; an image that could not be analysed gets a
group that says why. An image outside the model's intended use also names the gate's rule
("Outside intended use": patient age, view, image check…) — in the "not analysed" group when the
gate refused it, beside the finding when the site's policy only flags it. A first, study-level
group carries the study's finding (its positive image with the highest probability, else its image
with the highest probability). The operating point used — where it comes from (shipped, or a site
profile) and the image's population, e.g. "shipped / adults" — is an algorithm parameter. The
observer is the Lung Vision device; the report is UNVERIFIED.
"""

import hashlib
from dataclasses import dataclass

import highdicom as hd
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from common.identity import MANUFACTURER
from common.uids import derived_uid
from inference.intended_use import GateReason, GateVerdict
from inference.site_profile import OperatingPoint
from worker.encode.charset import declare_character_set
from worker.encode.equipment import Algorithm
from worker.encode.source_header import complete_source_header, require_references
from worker.encode.vr_values import MAX_LENGTH, fit_text, replace_controls

LOCAL_SCHEME = "99LUNGVISION"  # private coding scheme for concepts without a standard code
PNEUMONIA = Code("233604007", "SCT", "Pneumonia")
CHEST_XRAY = Code("168731009", "SCT", "Chest X-ray")
PNEUMONIA_PROBABILITY = Code("LV001", LOCAL_SCHEME, "Pneumonia probability (calibrated)")
DECISION_THRESHOLD = Code("LV002", LOCAL_SCHEME, "Decision threshold")
NOT_ANALYSED = Code("LV003", LOCAL_SCHEME, "Image not analysed")
STUDY_LEVEL = Code("LV004", LOCAL_SCHEME, "Study-level finding (positive first, highest probability)")
OUTSIDE_INTENDED_USE = Code("LV005", LOCAL_SCHEME, "Outside intended use")
GATE_RULES = {
    GateReason.MODALITY: Code("LV011", LOCAL_SCHEME, "Not a radiograph (modality)"),
    GateReason.BODY_PART: Code("LV012", LOCAL_SCHEME, "Not the chest (body part)"),
    GateReason.VIEW: Code("LV013", LOCAL_SCHEME, "Not a frontal view"),
    GateReason.AGE: Code("LV014", LOCAL_SCHEME, "Patient age outside the model's population"),
    GateReason.IMAGE_CHECK: Code("LV015", LOCAL_SCHEME, "Image unlike the training radiographs"),
}
NO_UNITS = codes.UCUM.NoUnits
SERIES_DESCRIPTION = "Lung Vision pneumonia findings (not for diagnostic use)"


@dataclass(frozen=True)
class ImageFinding:
    """What the worker concluded for one source image: a probability, or why there is none."""

    source: Dataset
    probability: float | None = None
    positive: bool | None = None
    not_analysed_reason: str | None = None  # e.g. "lateral view (ViewPosition LL)"
    heatmap_sc: Dataset | None = None
    gate: GateVerdict | None = None  # outside the intended use: refused (not analysed) or flagged (analysed)
    logit: float | None = None  # raw network output (site calibration refits from it)
    operating_point: OperatingPoint | None = None  # the point it was judged at: its population's; None: not analysed

    @property
    def analysed(self) -> bool:
        return self.probability is not None


def _reason_code(reason: str) -> Code:
    """A local code whose meaning is the human-readable reason, made a valid LO: reasons quote header
    values ("ViewPosition …"), which may hold control characters or a backslash; ≤ 64 bytes."""
    meaning = fit_text(replace_controls(reason).replace("\\", "/").strip(), MAX_LENGTH["LO"]) or "unknown"
    return Code(f"LV-{hashlib.sha256(reason.encode()).hexdigest()[:8]}", LOCAL_SCHEME, meaning)


def _tracking_uid(finding: ImageFinding, algorithm: Algorithm) -> str:
    return derived_uid(finding.source.SOPInstanceUID, algorithm.weights_sha256, "tracking")


def _image_group(
    finding: ImageFinding, threshold: float, algorithm_id: hd.sr.AlgorithmIdentification, tracking_uid: str
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    source_images = [hd.sr.SourceImageForMeasurementGroup.from_source_image(finding.source)]
    if finding.heatmap_sc is not None:
        source_images.append(hd.sr.SourceImageForMeasurementGroup.from_source_image(finding.heatmap_sc))
    tracking = hd.sr.TrackingIdentifier(uid=tracking_uid, identifier=f"image {finding.source.SOPInstanceUID}"[:64])
    gate = (
        []
        if finding.gate is None
        else [hd.sr.QualitativeEvaluation(OUTSIDE_INTENDED_USE, GATE_RULES[finding.gate.reason])]
    )
    if finding.probability is None:  # not analysed
        evaluation = hd.sr.QualitativeEvaluation(NOT_ANALYSED, _reason_code(finding.not_analysed_reason or "unknown"))
        return hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=tracking,
            algorithm_id=algorithm_id,
            qualitative_evaluations=[evaluation, *gate],
            source_images=source_images[:1],
        )
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking,
        finding_type=PNEUMONIA,
        algorithm_id=algorithm_id,
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(PNEUMONIA, codes.SCT.Present if finding.positive else codes.SCT.Absent),
            *gate,
        ],
        measurements=[
            hd.sr.Measurement(PNEUMONIA_PROBABILITY, round(finding.probability, 4), NO_UNITS),
            hd.sr.Measurement(DECISION_THRESHOLD, round(threshold, 4), NO_UNITS),
        ],
        source_images=source_images,
    )


def build_findings_sr(
    findings: list[ImageFinding],
    *,
    study_finding: ImageFinding | None,
    threshold: float,
    operating_point: str,
    algorithm: Algorithm,
    device_uid: str,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int,
    instance_number: int,
) -> hd.sr.ComprehensiveSR:
    """A Comprehensive SR about ``findings`` (images of one study).

    ``study_finding`` is the analysed image the study's finding comes from (``pipeline.study_finding``;
    None when no image of the study could be analysed); it becomes the first, study-level group.
    ``operating_point`` names where ``threshold`` comes from and its population ("shipped / children",
    "site profile <id> / adults": ``OperatingPoint.name``). Raises ValueError for findings it cannot
    report (see ``_check_findings``).
    """
    _check_findings(findings, study_finding)
    algorithm_id = hd.sr.AlgorithmIdentification(
        name=algorithm.name,
        version=algorithm.version,
        parameters=[
            f"weights sha256 {algorithm.weights_sha256}",
            f"operating point {operating_point} (threshold {threshold:.4f})",
        ],
    )
    groups = [_image_group(finding, threshold, algorithm_id, _tracking_uid(finding, algorithm)) for finding in findings]
    if study_finding is not None:
        assert study_finding.probability is not None  # checked above: an analysed image
        study_group = hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=derived_uid(study_finding.source.StudyInstanceUID, algorithm.weights_sha256, "study-finding"),
                identifier="study",
            ),
            finding_type=PNEUMONIA,
            finding_category=STUDY_LEVEL,
            algorithm_id=algorithm_id,
            qualitative_evaluations=[
                hd.sr.QualitativeEvaluation(
                    PNEUMONIA, codes.SCT.Present if study_finding.positive else codes.SCT.Absent
                )
            ],
            measurements=[hd.sr.Measurement(PNEUMONIA_PROBABILITY, round(study_finding.probability, 4), NO_UNITS)],
            source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(study_finding.source)],
        )
        groups.insert(0, study_group)
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_uid, name="Lung Vision", manufacturer_name=MANUFACTURER, model_name=algorithm.name
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=CHEST_XRAY,
        imaging_measurements=groups,
    )
    sr = _comprehensive_sr(
        report,
        _evidence(findings, study_finding),
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,
        is_verified=False,
        contributing_equipment=[algorithm.contributing_equipment()],
    )
    sr.SeriesDescription = SERIES_DESCRIPTION
    sr.SoftwareVersions = algorithm.software_versions  # type: ignore[assignment]  # highdicom: str or 1-tuple
    sr.ManufacturerModelName = algorithm.name
    return declare_character_set(sr)


def _check_findings(findings: list[ImageFinding], study_finding: ImageFinding | None) -> None:
    """Raise ValueError, saying what is wrong, unless there is at least one finding, each analysed one
    says positive or not, the study finding is an analysed one, and every image the report refers
    to has the UIDs to refer to it by."""
    if not findings:
        raise ValueError("a findings SR needs at least one image")
    for number, finding in enumerate(findings, start=1):
        if finding.analysed and finding.positive is None:
            raise ValueError(f"image {number} has a probability but no decision (positive is None)")
        require_references(finding.source, f"source image {number}")
        if finding.heatmap_sc is not None:
            require_references(finding.heatmap_sc, f"the heatmap SC of image {number}")
    if study_finding is not None:
        if not study_finding.analysed or study_finding.positive is None:
            raise ValueError("the study finding must be an analysed image with a decision")
        require_references(study_finding.source, "the source image of the study finding")


def _evidence(findings: list[ImageFinding], study_finding: ImageFinding | None) -> list[Dataset]:
    """Every instance the report's groups refer to: the source images (the study finding's too) and
    their heatmap SCs. The first one's clean header is also where the SR takes patient and study from."""
    sources = list(findings)
    if study_finding is not None and all(study_finding is not finding for finding in findings):
        sources.append(study_finding)
    evidence = [complete_source_header(finding.source) for finding in sources]
    return evidence + [finding.heatmap_sc for finding in findings if finding.heatmap_sc is not None]


def _comprehensive_sr(report: hd.sr.MeasurementReport, evidence: list[Dataset], **attributes) -> hd.sr.ComprehensiveSR:
    """A Comprehensive SR document holding ``report``, built without highdicom's copy of the content tree.

    Given a whole tree, highdicom deep-copies it, parses the copy and searches it three times (for
    the instances it refers to, which must all be in ``evidence``, and for 3-D coordinates, which a
    Comprehensive SR may not hold) — most of the cost of an SR. So it gets the report's root item
    alone, with ``evidence`` given explicitly (``_evidence``: by construction, every instance the
    groups refer to; all of it is listed as evidence either way), and the tree, built moments ago and
    used nowhere else, is attached afterwards — to the dataset and to highdicom's ``content`` view.
    """
    root = report[0]
    shell = Dataset()  # the root item with an empty Content Sequence
    for element in root:
        if element.keyword != "ContentSequence":
            shell.add(element)
    shell.ContentSequence = []
    sr = hd.sr.ComprehensiveSR(evidence=evidence, content=shell, **attributes)
    sr.ContentSequence = root.ContentSequence
    sr.content[0].ContentSequence = root.ContentSequence
    return sr
