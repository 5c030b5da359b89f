"""The image check: a Gaussian model of the training features, its threshold, and what the shipped
one refuses (non-radiographs, the adult vendor samples) and accepts (the training population)."""

import numpy as np
import pytest
import torch

from inference.classifier import load_classifier
from inference.image_check import ImageCheck, fit_image_check, threshold_for
from inference.images import read_gray
from inference.intended_use import GateReason
from tests.kit.data import CHEST_XRAY, DICOM_SAMPLES


def test_fitted_check_scores_far_points_higher_and_survives_a_round_trip(tmp_path) -> None:
    rng = np.random.default_rng(0)
    features = np.concatenate([rng.normal(0, 1, (300, 8)), rng.normal(3, 1, (300, 8))])
    labels = np.array([0] * 300 + [1] * 300)
    check = fit_image_check(features, labels)
    inside = check.scores(torch.from_numpy(rng.normal(0, 1, (50, 8)))).numpy()
    outside = check.scores(torch.from_numpy(rng.normal(12, 1, (50, 8)))).numpy()
    assert inside.max() < outside.min()
    assert threshold_for(inside, 0.02) == pytest.approx(np.quantile(inside, 0.98))
    loaded = ImageCheck.load(check.save(tmp_path / "check.safetensors"))
    assert torch.equal(loaded.means, check.means) and torch.equal(loaded.precision, check.precision)


def _verdicts(images: list[np.ndarray]):
    classifier = load_classifier()
    gate = classifier.intended_use()
    return [gate.image_verdict(p.image_check_score) for p in classifier.predict(images, with_heatmap=False)]


def test_the_shipped_check_refuses_non_radiographs() -> None:
    rng = np.random.default_rng(3)
    ramp = np.add.outer(np.arange(300.0), np.arange(300.0))
    images = [
        rng.integers(0, 256, (300, 300)).astype(np.float32),
        ramp.astype(np.float32),
        np.kron(np.indices((10, 10)).sum(axis=0) % 2, np.ones((30, 30))).astype(np.float32) * 255,
    ]
    assert all(verdict is not None and verdict.reason is GateReason.IMAGE_CHECK for verdict in _verdicts(images))


@pytest.mark.skipif(not DICOM_SAMPLES.exists(), reason="shared DICOM samples absent")
def test_the_shipped_check_accepts_the_adult_vendor_samples_as_adults() -> None:
    """The shipped model was trained on adults too: three vendors' adult chest films are inside its
    image check, and the check's nearest population is the adults' (what a film without an age gets)."""
    images = [read_gray(path) for path in sorted(DICOM_SAMPLES.glob("*.dcm"))]
    assert len(images) == 3 and all(verdict is None for verdict in _verdicts(images))
    assert [p.population for p in load_classifier().predict(images, with_heatmap=False)] == ["adults"] * 3


@pytest.mark.skipif(not CHEST_XRAY.exists(), reason="shared chest_xray data absent")
def test_the_shipped_check_accepts_the_pediatric_val_folder() -> None:
    from PIL import Image

    paths = sorted((CHEST_XRAY / "val").rglob("*.jpeg"))
    images = [np.asarray(Image.open(path).convert("L"), dtype=np.float32) for path in paths]
    refused = sum(verdict is not None for verdict in _verdicts(images))
    assert len(images) == 16 and refused <= 1  # the threshold refuses ~1 % of in-distribution images
