"""Grad-CAM: the closed form equals autograd Grad-CAM (pytorch-grad-cam) and is scaled sensibly."""

import numpy as np
import pytest
import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.image import scale_cam_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from inference.classifier import load_classifier
from inference.gradcam import class_activation_map, heatmap_in_image
from inference.network import build_resnet18


def _closed_form(model: torch.nn.Module, inputs: torch.Tensor) -> np.ndarray:
    features = {}
    handle = model.layer4.register_forward_hook(lambda _m, _i, output: features.update(a=output))
    with torch.no_grad():
        model(inputs)
    handle.remove()
    return class_activation_map(features["a"], model.fc.weight[0]).numpy()


@pytest.mark.parametrize("source", ["shipped", "random"])
def test_closed_form_equals_autograd_gradcam(source: str) -> None:
    if source == "shipped":
        model, size = load_classifier().network, load_classifier().card.input_size
    else:
        torch.manual_seed(0)
        model, size = build_resnet18().eval(), 160
    inputs = torch.randn(4, 1, size, size)
    # pytorch-grad-cam min–max scales each map, resizes it to the input, then min–max scales again.
    ours = scale_cam_image(scale_cam_image(_closed_form(model, inputs), target_size=(size, size)))
    with GradCAM(model=model, target_layers=[model.layer4]) as cam:
        reference = cam(input_tensor=inputs, targets=[ClassifierOutputTarget(0)] * 4)
    assert ours.shape == reference.shape
    assert np.abs(ours - reference).max() < 1e-4


def test_heatmap_is_scaled_by_probability_and_fills_the_image() -> None:
    cam = torch.tensor([[0.0, 1.0], [2.0, 4.0]])
    confident_normal = heatmap_in_image(cam, probability=0.02, image_shape=(30, 40))
    confident_positive = heatmap_in_image(cam, probability=0.97, image_shape=(30, 40))
    assert confident_normal.shape == (30, 40)
    assert confident_normal.max() <= 0.02 + 1e-6
    assert confident_positive.max() == pytest.approx(0.97, abs=0.01)
    assert heatmap_in_image(torch.zeros(2, 2), 0.9, (8, 8)).max() == 0


def test_the_two_heatmap_variants_of_one_class_map() -> None:
    from inference.gradcam import Heatmap, relative_map

    evidence = torch.tensor([[-3.0, -1.0], [-2.0, -0.5]])  # every cell against pneumonia
    assert relative_map(evidence, Heatmap.GRADCAM).max() == 0  # Grad-CAM's ReLU leaves nothing to show
    ranged = relative_map(evidence, Heatmap.CAM_RANGE)
    assert ranged.max() == 1 and ranged.min() == 0 and ranged[1, 1] == 1  # still points at the strongest cell
    mixed = torch.tensor([[-1.0, 2.0], [0.0, 4.0]])
    assert torch.equal(relative_map(mixed, Heatmap.GRADCAM), torch.tensor([[0.0, 0.5], [0.0, 1.0]]))
    assert heatmap_in_image(evidence, 0.8, (6, 6), Heatmap.CAM_RANGE).max() == pytest.approx(0.8, abs=0.01)
