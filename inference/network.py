"""Network — the ResNet-18 architecture Lung Vision trains from scratch (one gray channel in, one logit out)."""

import torch
import torchvision


def build_resnet18() -> torch.nn.Module:
    """ResNet-18 with a 1-channel stem and a single "pneumonia" logit; no pretrained weights."""
    model = torchvision.models.resnet18(weights=None, num_classes=1)
    model.conv1 = torch.nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return model
