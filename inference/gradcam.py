"""Grad-CAM — layer4 feature maps and the classifier weights become a pneumonia heatmap, in one pass.

For a network that ends in global average pooling and one linear unit, the pneumonia logit is
``b + Σ_k w_k · mean(A_k)``. Its gradient with respect to every position of feature map ``A_k`` is
``w_k / (h·w)``, so Grad-CAM's channel weights (the spatial mean of those gradients) are exactly
``w_k / (h·w)`` and the map is ``ReLU(Σ_k w_k A_k) / (h·w)``. No backward pass is needed: the cost
is one weighted sum over the features the forward pass already computed.

That weighted sum before the ReLU, the *class map* (CAM, Zhou et al. 2016), is each cell's evidence
for pneumonia. Two ways to show it, both one pass (the model card names the shipped one and the
localisation figures of both):

* ``Heatmap.GRADCAM``: Grad-CAM — the positive evidence, divided by its maximum. Blank when every
  cell's evidence is negative.
* ``Heatmap.CAM_RANGE``: the class map scaled over its own range (minimum → 0, maximum → 1), as in
  the CAM paper; never blank, so a positive call always shows where the evidence is strongest.
"""

from enum import Enum

import torch
import torch.nn.functional as F


class Heatmap(str, Enum):
    """How the class map becomes the shown heatmap."""

    GRADCAM = "gradcam"
    CAM_RANGE = "cam-range"


def class_map(features: torch.Tensor, fc_weight: torch.Tensor) -> torch.Tensor:
    """Each cell's pneumonia evidence: N×C×h×w features, C weights → N×h×w, ``Σ_k w_k A_k / (h·w)``."""
    height, width = features.shape[-2:]
    weights = fc_weight.detach().reshape(1, -1, 1, 1) / (height * width)
    return (features * weights).sum(dim=1)


def class_activation_map(features: torch.Tensor, fc_weight: torch.Tensor) -> torch.Tensor:
    """Grad-CAM of the single output unit: N×C×h×w features, C weights → N×h×w (unnormalised, ≥ 0)."""
    return torch.relu(class_map(features, fc_weight))


def relative_map(cam: torch.Tensor, kind: Heatmap = Heatmap.GRADCAM) -> torch.Tensor:
    """One h×w class map → 0..1 as ``kind`` shows it (all zeros when there is nothing to show)."""
    if kind is Heatmap.CAM_RANGE:
        low, high = cam.min(), cam.max()
        return (cam - low) / (high - low) if high > low else torch.zeros_like(cam)
    positive = torch.relu(cam)
    peak = positive.max()
    return positive / peak if peak > 0 else torch.zeros_like(cam)


def heatmap_in_image(
    cam: torch.Tensor, probability: float, image_shape: tuple[int, int], kind: Heatmap = Heatmap.GRADCAM
) -> torch.Tensor:
    """One h×w class map → a float32 0..1 heatmap of ``image_shape``, scaled by the pneumonia probability.

    Scaling: the map is made relative (``relative_map``: where the model looks) and multiplied by
    the calibrated probability (how sure it is), so a confident normal (probability 0.02) shows at
    most 2 % intensity anywhere, and only a confident positive shows a full-intensity hot spot.
    The model sees the whole image squashed into a square, so the map stretches back over the
    whole image — at any size: the image's, or the smaller picture it is drawn on. The h×w map is
    scaled before it is stretched (bilinear weights sum to one, so the result stays in
    0..probability): one pass over the large map.
    """
    scaled = relative_map(cam.float(), kind) * probability
    return F.interpolate(scaled[None, None], size=image_shape, mode="bilinear", align_corners=False)[0, 0]
