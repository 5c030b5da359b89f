"""Worker test fixtures: small DICOM studies written by our own sample_dicom factory."""

from pathlib import Path

import pytest
from pydicom.uid import JPEG2000, generate_uid

from inference.sample_dicom import wrap_image, write_dataset
from tests.kit.data import chest_pixels


def strip_type2(dataset) -> None:
    """Make the dataset as incomplete as real inputs often are."""
    for keyword in (
        "PatientID",
        "StudyDate",
        "StudyTime",
        "AccessionNumber",
        "ReferringPhysicianName",
        "StudyID",
        "PatientBirthDate",
        "PatientSex",
        "PatientOrientation",
    ):
        if keyword in dataset:
            delattr(dataset, keyword)


@pytest.fixture
def study_files(tmp_path) -> dict[str, Path]:
    """A study with a frontal MONOCHROME1 JPEG 2000 CR (incomplete header), a lateral view and a
    non-chest DX; returns their paths by role."""
    study_uid = generate_uid()
    datasets = {
        "frontal": wrap_image(
            chest_pixels(), photometric="MONOCHROME1", bits_stored=12, transfer_syntax=JPEG2000, study_uid=study_uid
        ),
        "lateral": wrap_image(chest_pixels(1), view_position="LL", study_uid=study_uid),
        "knee": wrap_image(chest_pixels(2), sop_class="DX", body_part="KNEE", view_position="AP", study_uid=study_uid),
    }
    strip_type2(datasets["frontal"])
    return {role: write_dataset(dataset, tmp_path / f"{role}.dcm") for role, dataset in datasets.items()}
