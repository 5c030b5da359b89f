"""Training augmentation — random geometric and photometric changes that a square may undergo.

Chosen against the acquisition shift between Kermany's train and test images: crops and small
rotations (field of view, positioning), gamma/blur/sharpness/noise/resolution loss (detector and
processing), random dark side bands (the known dark-border shortcut) and random erasing (burned-in
markers). Intensity normalisation (``preprocess.normalise``) is applied after, as at serving time.
"""

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2


class RandomGamma(torch.nn.Module):
    """Raise a 0..1 image to a random power in ``gamma_range``."""

    def __init__(self, gamma_range: tuple[float, float] = (0.6, 1.6)) -> None:
        super().__init__()
        self.log_low, self.log_high = torch.log(torch.tensor(gamma_range))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        gamma = torch.exp(torch.empty(1).uniform_(float(self.log_low), float(self.log_high)))
        return image.clamp_min(0).pow(gamma)


class RandomSideBands(torch.nn.Module):
    """Darken a random-width band at the left and/or right edge (up to ``max_fraction`` each)."""

    def __init__(self, p: float = 0.3, max_fraction: float = 0.15) -> None:
        super().__init__()
        self.p, self.max_fraction = p, max_fraction

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if torch.rand(1).item() >= self.p:
            return image
        image = image.clone()
        width = image.shape[-1]
        for side in (0, 1):
            if torch.rand(1).item() < 0.5:
                band = int(torch.rand(1).item() * self.max_fraction * width)
                if band:
                    region = image[..., :band] if side == 0 else image[..., width - band :]
                    region.mul_(torch.rand(1).item() * 0.3)
        return image


class RandomResolutionLoss(torch.nn.Module):
    """Downsample by a random factor and back up, as a lower-resolution detector would."""

    def __init__(self, p: float = 0.3, min_scale: float = 0.45) -> None:
        super().__init__()
        self.p, self.min_scale = p, min_scale

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if torch.rand(1).item() >= self.p:
            return image
        size = image.shape[-1]
        small = max(16, int(size * (self.min_scale + (1 - self.min_scale) * torch.rand(1).item())))
        down = torch.nn.functional.interpolate(image[None], size=(small, small), mode="bilinear", antialias=True)
        return torch.nn.functional.interpolate(down, size=(size, size), mode="bilinear")[0]


class TrainingTransform:
    """The augmentation of one 1×224×224 uint8 square → 1×crop×crop float in 0..1. The geometric part
    (crop, flip, rotation) moves a box mask given with the square the same way; the photometric part
    (gamma, contrast, blur, resolution, noise, bands, erasing) changes the image only."""

    def __init__(self, crop_size: int) -> None:
        self.geometric = v2.Compose(
            [
                v2.RandomResizedCrop(crop_size, scale=(0.6, 1.0), ratio=(0.8, 1.25), antialias=True),
                v2.RandomHorizontalFlip(),
                v2.RandomAffine(degrees=10, translate=(0.05, 0.05), shear=5),
            ]
        )
        self.photometric = v2.Compose(
            [
                v2.ToDtype(torch.float32, scale=True),
                RandomGamma(),
                v2.RandomApply([v2.ColorJitter(brightness=0.3, contrast=0.3)], p=0.5),
                v2.RandomApply([v2.GaussianBlur(5, sigma=(0.1, 1.5))], p=0.2),
                v2.RandomAdjustSharpness(2.0, p=0.2),
                RandomResolutionLoss(),
                RandomSideBands(),
                v2.RandomApply([v2.GaussianNoise(sigma=0.02, clip=True)], p=0.3),
                v2.RandomErasing(p=0.25, scale=(0.005, 0.03), value=0.0),
            ]
        )

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return self.photometric(self.geometric(image))

    def with_mask(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Augment ``image`` and move the 1×224×224 ``mask`` (uint8) with it."""
        moved_image, moved_mask = self.geometric(tv_tensors.Image(image), tv_tensors.Mask(mask))
        return self.photometric(moved_image.as_subclass(torch.Tensor)), moved_mask.as_subclass(torch.Tensor)


def training_transform(crop_size: int) -> TrainingTransform:
    """The augmentation applied to one 1×224×224 uint8 square; returns 1×crop×crop float in 0..1."""
    return TrainingTransform(crop_size)
