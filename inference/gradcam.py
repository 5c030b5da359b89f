"""Grad-CAM — layer4 feature maps and the classifier weights become a pneumonia heatmap, in one pass.

For a network that ends in global average pooling and one linear unit, the pneumonia logit is
``b + Σ_k w_k · mean(A_k)``. Its gradient with respect to every position of feature map ``A_k`` is
``w_k / (h·w)``, so Grad-CAM's channel weights (the spatial mean of those gradients) are exactly
``w_k / (h·w)`` and the map is ``ReLU(Σ_k w_k A_k) / (h·w)``. No backward pass is needed: the cost
is one weighted sum over the features the forward pass already computed.
"""

import torch
import torch.nn.functional as F


def class_activation_map(features: torch.Tensor, fc_weight: torch.Tensor) -> torch.Tensor:
    """Grad-CAM of the single output unit: N×C×h×w features, C weights → N×h×w (unnormalised, ≥ 0)."""
    height, width = features.shape[-2:]
    weights = fc_weight.detach().reshape(1, -1, 1, 1) / (height * width)
    return torch.relu((features * weights).sum(dim=1))


def heatmap_in_image(cam: torch.Tensor, probability: float, image_shape: tuple[int, int]) -> torch.Tensor:
    """One h×w map → a 0..1 heatmap of ``image_shape``, scaled by the pneumonia probability.

    Scaling: the map is divided by its own maximum (where the model looks) and multiplied by the
    calibrated probability (how sure it is), so a confident normal (probability 0.02) shows at
    most 2 % intensity anywhere, and only a confident positive shows a full-intensity hot spot.
    The model sees the whole image squashed into a square, so the map stretches back over the
    whole image.
    """
    peak = cam.max()
    relative = cam / peak if peak > 0 else torch.zeros_like(cam)
    resized = F.interpolate(relative[None, None], size=image_shape, mode="bilinear", align_corners=False)[0, 0]
    return (resized.clamp(0, 1) * probability).to(torch.float32)
