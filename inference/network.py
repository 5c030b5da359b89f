"""Network — the ResNet-18 architecture Lung Vision trains from scratch (one gray channel in, one logit out).

It is torchvision's ``resnet18(weights=None, num_classes=1)`` with a 1-channel stem, written out here:
the same modules under the same names (so the shipped weights, the Grad-CAM hooks on ``layer4`` and the
image check's ``layer1``–``layer4`` are unchanged), the same initialisation, the same forward pass —
tests/inference/test_network.py proves it against torchvision on every build. Why not import it:
``import torchvision`` also imports ``torch._dynamo`` (through ``torchvision.ops``), sympy and triton —
≈ 2.3 s and ≈ 85 MB of the worker's memory that the pool processes inherit, for a model that needs
none of them (issue 12). Training still uses torchvision's augmentations (inference/augment.py).
"""

import torch
from torch import nn

BLOCKS_PER_STAGE = 2  # ResNet-18


class BasicBlock(nn.Module):
    """Two 3×3 convolutions with a shortcut (a 1×1 convolution where the shape changes)."""

    def __init__(self, in_channels: int, channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.downsample = (
            nn.Sequential(
                nn.Conv2d(in_channels, channels, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(channels)
            )
            if stride != 1 or in_channels != channels
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + shortcut)


class ResNet18(nn.Module):
    """ResNet-18: a 7×7 stem, four stages of two basic blocks, global average pooling, one linear head."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = stage(64, 64, stride=1)
        self.layer2 = stage(64, 128, stride=2)
        self.layer3 = stage(128, 256, stride=2)
        self.layer4 = stage(256, 512, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512, num_classes)
        for module in self.modules():  # torchvision's initialisation (the head keeps PyTorch's default)
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.constant_(module.weight, 1)
                nn.init.constant_(module.bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = stage(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def stage(in_channels: int, channels: int, stride: int) -> nn.Sequential:
    """A residual stage: its first block changes the shape (``stride``, ``channels``), the others keep it."""
    blocks = [BasicBlock(in_channels, channels, stride)]
    blocks += [BasicBlock(channels, channels, 1) for _ in range(1, BLOCKS_PER_STAGE)]
    return nn.Sequential(*blocks)


def build_resnet18() -> torch.nn.Module:
    """ResNet-18 with a 1-channel stem and a single "pneumonia" logit; no pretrained weights.

    Built as it always was from torchvision: the RGB network, then its stem replaced by a gray one
    (PyTorch's default initialisation) — the same random draws, so training with the same seed starts
    from the same weights as before."""
    model = ResNet18(in_channels=3, num_classes=1)
    model.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return model
