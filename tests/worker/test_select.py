"""Selection: our own objects are skipped; everything else gets the intended-use gate's header verdict."""

import numpy as np

from common.identity import MANUFACTURER
from inference.classifier import load_classifier
from inference.intended_use import GateReason
from inference.sample_dicom import wrap_image
from worker.select import OWN_OBJECT, select

PIXELS = np.arange(64 * 64, dtype=np.uint8).reshape(64, 64)


def test_frontal_chest_radiographs_are_candidates() -> None:
    selection = select(wrap_image(PIXELS), load_classifier().intended_use())
    assert selection.skip_reason is None and selection.verdict is None


def test_laterals_and_other_body_parts_get_the_gates_verdict() -> None:
    gate = load_classifier().intended_use()
    assert select(wrap_image(PIXELS, view_position="LL"), gate).verdict.reason is GateReason.VIEW
    assert select(wrap_image(PIXELS, body_part="KNEE"), gate).verdict.reason is GateReason.BODY_PART


def test_our_own_objects_are_never_analysed() -> None:
    dataset = wrap_image(PIXELS)
    dataset.Manufacturer = MANUFACTURER
    assert select(dataset, load_classifier().intended_use()).skip_reason == OWN_OBJECT
