"""Classifier — gray images become calibrated pneumonia probabilities with Grad-CAM heatmaps.

The shipped weights are loaded once per process (``load_classifier``) and verified against the
sha256 in the model card before use.
"""

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from safetensors.torch import load_file

from inference.gradcam import class_activation_map, heatmap_in_image
from inference.model_card import WEIGHTS_DIR, ModelCard, sha256_of
from inference.network import build_resnet18
from inference.preprocess import normalise, to_square_uint8


class WeightsMismatch(RuntimeError):
    """The weights file does not match the sha256 recorded in its model card."""


@dataclass(frozen=True)
class Prediction:
    """The model's answer for one image."""

    probability: float  # calibrated probability of pneumonia
    positive: bool  # probability ≥ threshold
    label: str  # "PNEUMONIA" or "NORMAL"
    threshold: float
    model_version: str
    heatmap: np.ndarray | None  # float32 0..1, the input image's shape; None if not asked for


class Classifier:
    """ResNet-18 pneumonia classifier with its model card (threshold, temperature, input size)."""

    def __init__(self, weights_dir: Path = WEIGHTS_DIR) -> None:
        self.card = ModelCard.load(weights_dir)
        weights_path = weights_dir / self.card.weights_file
        actual = sha256_of(weights_path)
        if actual != self.card.weights_sha256:
            raise WeightsMismatch(
                f"{weights_path} has sha256 {actual}, the model card expects {self.card.weights_sha256}"
            )
        self.network = build_resnet18()
        self.network.load_state_dict(load_file(weights_path))
        self.network.eval()
        self._features: torch.Tensor | None = None
        self.network.layer4.register_forward_hook(self._keep_features)

    def _keep_features(self, _module: torch.nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        self._features = output

    @property
    def version(self) -> str:
        """Model name and version, e.g. ``lungvision-resnet18 1.0.0``."""
        return f"{self.card.name} {self.card.version}"

    def logits(self, squares: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """N×224×224 uint8 squares → (N raw logits, N×h×w Grad-CAM maps)."""
        batch = torch.from_numpy(np.ascontiguousarray(squares))[:, None]
        with torch.inference_mode():
            logits = self.network(normalise(batch, self.card.input_size)).flatten()
            cams = class_activation_map(self._features, self.network.fc.weight[0])
        return logits, cams

    def probabilities(self, squares: np.ndarray) -> np.ndarray:
        """Calibrated pneumonia probabilities for N×224×224 uint8 squares."""
        logits, _ = self.logits(squares)
        return torch.sigmoid(logits / self.card.temperature).numpy()

    def predict(self, images: Sequence[np.ndarray], with_heatmap: bool = True) -> list[Prediction]:
        """One forward pass for a batch of 2-D gray images (any size, bright = dense)."""
        if not images:
            return []
        squares = np.stack([to_square_uint8(image) for image in images])
        return self.predict_squares(squares, [image.shape for image in images] if with_heatmap else None)

    def predict_squares(self, squares: np.ndarray, image_shapes: Sequence[tuple[int, int]] | None) -> list[Prediction]:
        """Predictions for preprocessed squares; heatmaps sized to ``image_shapes`` (None: no heatmaps)."""
        logits, cams = self.logits(squares)
        probabilities = torch.sigmoid(logits / self.card.temperature).tolist()
        predictions = []
        for index, (probability, cam) in enumerate(zip(probabilities, cams)):
            positive = probability >= self.card.threshold
            heatmap = None if image_shapes is None else heatmap_in_image(cam, probability, image_shapes[index]).numpy()
            predictions.append(Prediction(probability, positive, "PNEUMONIA" if positive else "NORMAL",
                                          self.card.threshold, self.version, heatmap))
        return predictions


@functools.lru_cache(maxsize=4)
def load_classifier(weights_dir: Path | None = None) -> Classifier:
    """The process-wide classifier for ``weights_dir`` (default: the shipped weights), loaded once."""
    return Classifier(weights_dir or WEIGHTS_DIR)
