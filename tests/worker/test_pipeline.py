"""The analysis pipeline end to end without networking: files in, valid SC + SR files out."""

import os
from pathlib import Path

import numpy as np
import pytest
from pydicom import Dataset, dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, generate_uid

from common.results import Finding, GateReason, StudyStatus
from inference.classifier import load_classifier
from tests.kit.dicom_checks import COMPREHENSIVE_SR_CLASS, SC_CLASS, dciodvfy_errors, sr_values
from tests.kit.pipeline import run_pipeline
from tests.kit.worker import make_message
from worker import pipeline


@pytest.fixture
def outcome(study_files, tmp_path):
    paths = [study_files["frontal"], study_files["lateral"], study_files["knee"]]
    classifier = load_classifier()
    return run_pipeline(make_message(paths), classifier, tmp_path / "outbox")


def test_one_sc_per_analysed_image_and_one_sr_per_image(outcome) -> None:
    classes = [dcmread(path, stop_before_pixels=True).SOPClassUID for path in outcome.files]
    assert classes.count(SC_CLASS) == 1
    assert classes.count(COMPREHENSIVE_SR_CLASS) == 3
    assert [image.not_analysed_reason for image in outcome.images] == [
        None,
        "lateral view (ViewPosition LL)",
        "body part KNEE is not the chest",
    ]


def test_outputs_are_valid_dicom(outcome) -> None:
    for path in outcome.files:
        assert dciodvfy_errors(path) == [], path.name


def test_outputs_stay_in_the_source_study_and_name_lung_vision(outcome, study_files) -> None:
    source = dcmread(study_files["frontal"], stop_before_pixels=True)
    for path in outcome.files:
        output = dcmread(path, stop_before_pixels=True)
        assert output.StudyInstanceUID == source.StudyInstanceUID
        assert output.PatientName == source.PatientName
        assert output.Manufacturer == "Lung Vision"
        assert any("lungvision" in version for version in output.SoftwareVersions)
        assert "Lung Vision" in [item.Manufacturer for item in output.ContributingEquipmentSequence]


def test_heatmap_sc_is_derived_burned_in_and_small(outcome, study_files) -> None:
    sc = next(dcmread(path) for path in outcome.files if dcmread(path, stop_before_pixels=True).SOPClassUID == SC_CLASS)
    assert sc.BurnedInAnnotation == "YES"
    assert list(sc.ImageType)[:2] == ["DERIVED", "SECONDARY"]
    assert max(sc.Rows, sc.Columns) <= 512
    # JPEG Baseline by default (worker.sc_compression), declared lossy, and decodable to a colour picture
    assert (sc.file_meta.TransferSyntaxUID, sc.PhotometricInterpretation) == (JPEGBaseline8Bit, "YBR_FULL_422")
    assert sc.LossyImageCompression == "01" and sc.pixel_array.shape == (sc.Rows, sc.Columns, 3)
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == dcmread(study_files["frontal"]).SOPInstanceUID


def test_the_sc_shows_the_picture_lungvision_analyze_draws(study_files, tmp_path) -> None:
    """The worker draws the SC's gray picture on a thread while the model runs, then the heat and legend
    over it: pixel for pixel the picture ``render_overlay`` draws in one go (radiologists see one picture)."""
    from inference.dicom_pixels import dataset_to_gray
    from inference.overlay import display_size, legend_lines, render_overlay
    from inference.preprocess import to_square_uint8

    classifier = load_classifier()
    outcome = run_pipeline(
        make_message([study_files["frontal"]]),
        classifier,
        tmp_path / "outbox",
        max_long_side=150,  # the 224×224 image shrunk: the picture's one pass over the full-size pixels
        sc_compression="none",  # the pixels as drawn
    )
    sc = next(dcmread(path) for path in outcome.files if dcmread(path, stop_before_pixels=True).SOPClassUID == SC_CLASS)

    gray = dataset_to_gray(dcmread(study_files["frontal"]))
    size = display_size(gray.shape, 150)
    (prediction,) = classifier.predict_squares(to_square_uint8(gray)[None], [size])
    legend = legend_lines(prediction.probability, prediction.positive, prediction.threshold, prediction.model_version)
    assert prediction.heatmap is not None
    assert np.array_equal(sc.pixel_array, render_overlay(gray, prediction.heatmap, legend, 150))


def test_sr_says_what_the_model_said(outcome) -> None:
    frontal = outcome.findings[0]
    sr = dcmread(outcome.files[1])
    assert sr.VerificationFlag == "UNVERIFIED"
    values = sr_values(sr)
    assert values["Pneumonia probability (calibrated)"][0] == pytest.approx(frontal.probability, abs=1e-4)
    assert values["Decision threshold"] == [pytest.approx(load_classifier().card.threshold, abs=1e-4)]
    assert values["Pneumonia"][0] == ("Present" if frontal.positive else "Absent")
    assert f"weights sha256 {load_classifier().card.weights_sha256}" in values["Algorithm Parameters"]

    lateral_sr = dcmread(outcome.files[2])
    assert sr_values(lateral_sr)["Image not analysed"] == ["lateral view (ViewPosition LL)"]


def test_analysing_again_gives_the_same_uids(outcome, study_files, tmp_path) -> None:
    paths = [study_files["frontal"], study_files["lateral"], study_files["knee"]]
    classifier = load_classifier()
    again = run_pipeline(make_message(paths), classifier, tmp_path / "outbox2")
    assert [path.name for path in again.files] == [path.name for path in outcome.files]


@pytest.fixture
def adult_and_child(tmp_path):
    """A frontal chest image of a 12-year-old (an age no shipped population covers: the model has seen
    children of one to five and adults) and one of a 4-year-old, in one study."""
    from inference.sample_dicom import wrap_image, write_dataset
    from tests.kit.data import chest_pixels

    study_uid = generate_uid()
    adult = wrap_image(chest_pixels(2), study_uid=study_uid)
    adult.PatientAge = "012Y"
    child = wrap_image(chest_pixels(3), study_uid=study_uid)
    child.PatientBirthDate, child.StudyDate = "20200301", "20240301"
    return [write_dataset(adult, tmp_path / "adult.dcm"), write_dataset(child, tmp_path / "child.dcm")]


def test_refused_image_gets_no_probability_and_says_why(adult_and_child, tmp_path) -> None:
    classifier = load_classifier()
    outcome = run_pipeline(make_message(adult_and_child), classifier, tmp_path / "outbox")
    adult, child = outcome.images
    assert adult.probability is None and adult.sc_uid is None and adult.intended_use is False
    assert adult.gate_reason is GateReason.AGE and "12 years" in adult.not_analysed_reason
    assert child.probability is not None and child.intended_use is True
    assert outcome.status is StudyStatus.ANALYSED
    assert outcome.gate_counts() == {"refused": {"age": 1}, "flagged": {}}
    adult_sr = dcmread(next(path for path in outcome.files if path.stem == adult.sr_uid))
    values = sr_values(adult_sr)
    assert values["Image not analysed"] == [adult.not_analysed_reason]
    assert values["Outside intended use"] == ["Patient age outside the model's population"]
    assert "Pneumonia probability (calibrated)" in values  # the study-level group (from the child) only
    assert len(values["Pneumonia probability (calibrated)"]) == 1
    assert "operating point shipped" in " ".join(values["Algorithm Parameters"])
    for path in outcome.files:
        assert dciodvfy_errors(path) == [], path.name


def test_flag_policy_analyses_and_marks_the_image(adult_and_child, tmp_path) -> None:
    classifier = load_classifier()
    gate = classifier.intended_use(policy="flag")
    outcome = run_pipeline(make_message(adult_and_child[:1]), classifier, tmp_path / "outbox", gate=gate)
    (adult,) = outcome.images
    assert adult.probability is not None and adult.sc_uid and adult.intended_use is False
    assert outcome.gate_counts() == {"refused": {}, "flagged": {"age": 1}}
    assert "12 years" in outcome.remark
    values = sr_values(dcmread(next(path for path in outcome.files if path.stem == adult.sr_uid)))
    assert "Patient age outside the model's population" in values["Outside intended use"]


def test_every_image_refused_makes_the_round_outside_use(adult_and_child, tmp_path) -> None:
    classifier = load_classifier()
    outcome = run_pipeline(make_message(adult_and_child[:1]), classifier, tmp_path / "outbox")
    assert outcome.status is StudyStatus.OUTSIDE_USE and outcome.finding is Finding.NOT_ANALYSED
    assert outcome.top is None


def test_each_image_gets_its_populations_operating_point(two_population_weights, tmp_path) -> None:
    """A two-population model: the header's age chooses each image's operating point; the SR and the
    store name population and point; an age between the populations is refused."""
    from inference.classifier import Classifier
    from inference.sample_dicom import wrap_image, write_dataset
    from tests.kit.data import chest_pixels

    study_uid = generate_uid()
    paths = []
    for name, age in (("adult", "040Y"), ("child", "004Y"), ("gap", "010Y")):
        dataset = wrap_image(chest_pixels(4), study_uid=study_uid)
        dataset.PatientAge = age
        paths.append(write_dataset(dataset, tmp_path / f"{name}.dcm"))
    classifier = Classifier(two_population_weights)
    outcome = run_pipeline(make_message(paths), classifier, tmp_path / "outbox")
    adult, child, gap = outcome.images
    assert (adult.population, adult.threshold, adult.operating_point) == ("adults", 0.7, "shipped / adults")
    assert (child.population, child.threshold, child.operating_point) == ("children", 0.2, "shipped / children")
    assert gap.probability is None and gap.gate_reason is GateReason.AGE and gap.population is None
    assert "populations 1 to <6, 18 to <90 years" in gap.not_analysed_reason
    # the same pixels: one logit, two temperatures and thresholds
    assert adult.logit == pytest.approx(child.logit, abs=1e-4)
    assert adult.positive == (adult.probability >= 0.7) and child.positive == (child.probability >= 0.2)
    for image, threshold in ((adult, 0.7), (child, 0.2)):
        values = sr_values(dcmread(next(path for path in outcome.files if path.stem == image.sr_uid)))
        assert (
            f"operating point shipped / {image.population} (threshold {threshold:.4f})"
            in values["Algorithm Parameters"]
        )
        assert values["Decision threshold"] == [pytest.approx(threshold)]
    top = outcome.top  # the study's finding: a positive image first, then the highest probability
    assert top.positive == any(image.positive for image in (adult, child))
    assert outcome.operating_point is top.operating_point
    for path in outcome.files:
        assert dciodvfy_errors(path) == [], path.name


def test_the_study_finding_is_a_positive_image_before_a_higher_negative_one() -> None:
    """With per-population thresholds a lower probability can be positive beside a higher negative one."""
    from pydicom import Dataset

    from worker.encode.findings_sr import ImageFinding
    from worker.pipeline import study_finding

    negative_adult = ImageFinding(Dataset(), probability=0.6, positive=False)
    positive_child = ImageFinding(Dataset(), probability=0.3, positive=True)
    refused = ImageFinding(Dataset(), not_analysed_reason="lateral view")
    assert study_finding([negative_adult, positive_child, refused]) is positive_child
    assert study_finding([negative_adult, refused]) is negative_adult and study_finding([refused]) is None


def _output(rows: int = 2) -> Dataset:
    """A minimal dataset write_outputs can write (``rows`` over 65535 cannot be encoded as US)."""
    dataset = Dataset()
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset.SOPClassUID = SC_CLASS
    dataset.SOPInstanceUID = generate_uid()
    dataset.add_new(0x00280010, "US", rows)  # Rows
    return dataset


def test_every_output_is_on_disk_before_any_gets_its_name(tmp_path, monkeypatch) -> None:
    """Files are fsynced (on a thread, beside the next file's encoding) before the renames, the renames
    before the folder's fsync: after a crash a name holds a complete file or does not exist."""
    events: list[tuple[str, str]] = []
    fsync, replace = os.fsync, Path.replace

    def recorded_fsync(descriptor: int) -> None:
        events.append(("fsync", Path(os.readlink(f"/proc/self/fd/{descriptor}")).name))
        fsync(descriptor)

    def recorded_replace(self: Path, target) -> Path:
        events.append(("rename", self.name))
        return replace(self, target)

    monkeypatch.setattr(pipeline.os, "fsync", recorded_fsync)
    monkeypatch.setattr(Path, "replace", recorded_replace)
    datasets = [_output(), _output()]
    paths = pipeline.write_outputs(datasets, tmp_path / "outbox" / "study")

    partials = [f"{dataset.SOPInstanceUID}.partial" for dataset in datasets]
    assert [path.name for path in paths] == [f"{dataset.SOPInstanceUID}.dcm" for dataset in datasets]
    assert sorted(events[:2]) == sorted(("fsync", name) for name in partials)
    assert events[2:] == [("rename", partials[0]), ("rename", partials[1]), ("fsync", "study"), ("fsync", "outbox")]
    assert sorted(path.name for path in paths[0].parent.iterdir()) == sorted(path.name for path in paths)
    assert all(dcmread(path).SOPInstanceUID == dataset.SOPInstanceUID for path, dataset in zip(paths, datasets))


def test_an_output_that_cannot_be_written_leaves_no_named_file(tmp_path) -> None:
    with pytest.warns(UserWarning):
        unwritable = _output(rows=70000)
    with pytest.raises(OSError, match="ushort"):
        pipeline.write_outputs([_output(), unwritable], tmp_path / "outbox")
    assert not list((tmp_path / "outbox").glob("*.dcm"))
