"""Selection of frontal chest radiographs, with the reason for everything else."""

import numpy as np
import pytest

from dicom_node.identity import MANUFACTURER
from inference.sample_dicom import wrap_image
from worker.select import not_analysed_reason

PIXELS = np.arange(64 * 64, dtype=np.uint8).reshape(64, 64)


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({}, None),
        ({"view_position": "AP"}, None),
        ({"view_position": ""}, None),
        ({"body_part": ""}, None),
        ({"body_part": "THORAX"}, None),
        ({"sop_class": "DX"}, None),
        ({"view_position": "LL"}, "lateral view (ViewPosition LL)"),
        ({"view_position": "LATERAL"}, "lateral view (ViewPosition LATERAL)"),
        ({"body_part": "KNEE"}, "body part KNEE is not the chest"),
        ({"modality": "MR"}, "modality MR is not a radiograph (CR/DX)"),
        ({"sop_class": "SC"}, None),  # SC with BodyPartExamined CHEST
        ({"sop_class": "SC", "body_part": ""}, "secondary capture without chest radiograph hints"),
    ],
)
def test_reasons(options: dict, expected: str | None) -> None:
    assert not_analysed_reason(wrap_image(PIXELS, **options)) == expected


def test_secondary_capture_with_chest_description_is_analysed() -> None:
    dataset = wrap_image(PIXELS, sop_class="SC", body_part="")
    dataset.StudyDescription = "XR CHEST 1 VIEW"
    assert not_analysed_reason(dataset) is None


def test_our_own_objects_are_never_analysed() -> None:
    dataset = wrap_image(PIXELS)
    dataset.Manufacturer = MANUFACTURER
    assert not_analysed_reason(dataset) == "created by Lung Vision"
