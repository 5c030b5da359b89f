"""The shipped model: hash verified on load, one process-wide instance, sane predictions."""

import shutil

import numpy as np
import pytest

from inference.classifier import Classifier, WeightsMismatch, load_classifier
from inference.images import read_gray
from inference.model_card import WEIGHTS_DIR, ModelCard, sha256_of
from tests.kit.data import CHEST_XRAY, require


def test_shipped_weights_match_the_model_card() -> None:
    card = ModelCard.load()
    weights = WEIGHTS_DIR / card.weights_file
    assert sha256_of(weights) == card.weights_sha256
    assert weights.stat().st_size <= 45 * 1024 * 1024
    assert card.labels == ["NORMAL", "PNEUMONIA"] and 0 < card.threshold < 1 and card.temperature > 0


def test_tampered_weights_are_refused(tmp_path) -> None:
    for path in WEIGHTS_DIR.iterdir():
        shutil.copy(path, tmp_path / path.name)
    weights = tmp_path / ModelCard.load().weights_file
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(WeightsMismatch, match="sha256"):
        Classifier(tmp_path)


def test_loaded_once_per_process() -> None:
    assert load_classifier() is load_classifier()


def test_predictions_have_heatmaps_in_image_coordinates() -> None:
    classifier = load_classifier()
    images = [np.random.default_rng(0).random((300, 250), dtype=np.float32), np.zeros((64, 80), np.float32)]
    predictions = classifier.predict(images)
    for image, prediction in zip(images, predictions):
        assert 0 <= prediction.probability <= 1
        assert prediction.heatmap.shape == image.shape
        assert prediction.heatmap.max() <= prediction.probability + 1e-6
        assert prediction.label == ("PNEUMONIA" if prediction.positive else "NORMAL")
        assert prediction.model_version == classifier.version


def test_training_images_are_told_apart() -> None:
    train = require(CHEST_XRAY / "train")
    normal = [read_gray(path) for path in sorted((train / "NORMAL").glob("*.jpeg"))[:8]]
    pneumonia = [read_gray(path) for path in sorted((train / "PNEUMONIA").glob("*.jpeg"))[:8]]
    probabilities = [p.probability for p in load_classifier().predict(normal + pneumonia, with_heatmap=False)]
    assert np.mean(probabilities[8:]) > np.mean(probabilities[:8]) + 0.3
