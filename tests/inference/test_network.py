"""Our ResNet-18 is torchvision's: the same parameters from the same seed, the same outputs, and no
torchvision (so no torch._dynamo, sympy or triton) in a process that only runs the model."""

import pytest
import torch
import torchvision

from inference.network import build_resnet18
from tests.kit.imports import loaded_after


def torchvision_resnet18() -> torch.nn.Module:
    """What inference/network.py built before it stopped importing torchvision."""
    model = torchvision.models.resnet18(weights=None, num_classes=1)
    model.conv1 = torch.nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return model


def test_same_parameters_and_buffers_from_the_same_seed() -> None:
    torch.manual_seed(7)
    ours = build_resnet18().state_dict()
    torch.manual_seed(7)
    reference = torchvision_resnet18().state_dict()
    assert list(ours) == list(reference)  # names and order: the shipped weights and the hooks' layer names
    for name, tensor in reference.items():
        assert ours[name].shape == tensor.shape, name
        assert torch.equal(ours[name], tensor), name


@pytest.mark.parametrize("training", [False, True])
def test_same_outputs_and_gradients(training: bool) -> None:
    torch.manual_seed(3)
    ours, reference = build_resnet18(), torchvision_resnet18()
    reference.load_state_dict(ours.state_dict())
    ours.train(training)
    reference.train(training)
    inputs = torch.randn(3, 1, 96, 96)
    out, expected = ours(inputs), reference(inputs)
    assert torch.allclose(out, expected, rtol=0, atol=1e-6)
    out.sum().backward()
    expected.sum().backward()
    for (name, mine), theirs in zip(ours.named_parameters(), reference.parameters()):
        assert mine.grad is not None and theirs.grad is not None
        assert torch.allclose(mine.grad, theirs.grad, rtol=1e-5, atol=1e-6), name


def test_a_worker_running_the_shipped_model_does_not_import_torchvision() -> None:
    pool_process = (
        "import worker.celery_app, worker.tasks\n"  # what a worker's pool process imports
        "from inference.classifier import load_classifier\n"
        "load_classifier()"
    )
    assert loaded_after(pool_process, ("torchvision", "torch._dynamo", "sympy")) == []
