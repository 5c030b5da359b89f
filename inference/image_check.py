"""Image check — the classifier's own features become an out-of-distribution score, in the same pass.

The spatial means of the four residual stages' feature maps (``layer1``–``layer4``: 64 + 128 + 256
+ 512 values per image; chosen in ``scripts/gate_design.py`` over five other feature sets and four
nearest-neighbour variants, on half of the adult training images) are compared with the training
images: one Gaussian per class with a shared covariance (Ledoit–Wolf
shrinkage), fitted on the training side of the split. The score is the Mahalanobis distance to
the nearest class mean: small for images like the training radiographs, large for other
populations, other views, other species or no radiograph at all. The threshold is a high
percentile of the *validation* side's scores (images the network never trained on), so only that
share of in-distribution images is refused. Cost per image: four spatial means and one 960×960
quadratic form.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

FEATURE_LAYERS = ("layer1", "layer2", "layer3", "layer4")
IMAGE_CHECK_FILE = "image-check.safetensors"
REFUSED_VALIDATION_SHARE = 0.01  # the threshold refuses this share of the validation images


@dataclass(frozen=True)
class ImageCheck:
    """Group means (G×D), the shared precision matrix (D×D) of the training features, and the
    population (an index into the model card's population names) each group belongs to."""

    means: torch.Tensor
    precision: torch.Tensor
    group_population: torch.Tensor | None = None  # G int64; None: one population

    def distances(self, features: torch.Tensor) -> torch.Tensor:
        """N×D pooled features → N×G Mahalanobis distances to every group mean."""
        differences = features.to(self.means.dtype)[:, None, :] - self.means[None]
        squared = torch.einsum("ncd,de,nce->nc", differences, self.precision, differences)
        return squared.clamp_min(0).sqrt()

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        """N×D pooled features → N distances to the nearest group mean."""
        return self.distances(features).min(dim=1).values

    def nearest_population(self, features: torch.Tensor) -> torch.Tensor:
        """N×D pooled features → the population index of each image's nearest group (0 with one population)."""
        nearest = self.distances(features).argmin(dim=1)
        return torch.zeros_like(nearest) if self.group_population is None else self.group_population[nearest]

    def save(self, path: Path) -> Path:
        tensors = {"means": self.means.contiguous(), "precision": self.precision.contiguous()}
        if self.group_population is not None:
            tensors["group_population"] = self.group_population.contiguous()
        save_file(tensors, path)
        return path

    @classmethod
    def load(cls, path: Path) -> "ImageCheck":
        tensors = load_file(path)
        return cls(tensors["means"], tensors["precision"], tensors.get("group_population"))


def fit_image_check(features: np.ndarray, labels: np.ndarray, populations: np.ndarray | None = None) -> ImageCheck:
    """Fit one mean per (population, class) group and the shrunk shared covariance on training
    features (N×D); ``populations`` holds each image's population index (None: one population)."""
    from sklearn.covariance import LedoitWolf  # here, not at the top: the worker, which never fits, is spared sklearn

    features = np.asarray(features, dtype=np.float64)
    populations = np.zeros(len(labels), dtype=np.int64) if populations is None else np.asarray(populations)
    groups = np.asarray(populations) * 2 + np.asarray(labels)
    present = sorted(set(groups.tolist()))
    means = np.stack([features[groups == g].mean(axis=0) for g in present])
    centred = features - means[np.searchsorted(present, groups)]
    precision = LedoitWolf(assume_centered=True).fit(centred).precision_
    return ImageCheck(
        torch.as_tensor(means, dtype=torch.float32),
        torch.as_tensor(precision, dtype=torch.float32),
        torch.as_tensor([g // 2 for g in present], dtype=torch.int64),
    )


def threshold_for(validation_scores: np.ndarray, refused_share: float = REFUSED_VALIDATION_SHARE) -> float:
    """The score above which ``refused_share`` of the validation images lie."""
    return float(np.quantile(np.asarray(validation_scores, dtype=np.float64), 1.0 - refused_share))
