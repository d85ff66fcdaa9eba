"""The seed's augmentation, applied to whole batches on the trial's device.

Flips, rotation, colour jitter and Gaussian noise, each drawn per sample, in one
pass over a (B, 3, H, W) float batch in [0, 1]. One `strength` in [0, 1] scales all
of them, so the search tunes a single knob rather than a dozen correlated ones.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

MAX_ROTATION_DEGREES = 30.0
MAX_JITTER = 0.4  # brightness, contrast and saturation factors in [1 - j, 1 + j]
MAX_NOISE_STD = 0.05


def augment_batch(images: torch.Tensor, strength: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Augmented copy of a float batch in [0, 1]; identity when strength is 0."""
    if strength <= 0:
        return images
    batch = images.shape[0]

    def uniform(low: float, high: float) -> torch.Tensor:
        draw = torch.rand(batch, device=images.device, generator=generator, dtype=images.dtype)
        return (low + (high - low) * draw).view(batch, 1, 1, 1)

    def coin() -> torch.Tensor:
        return uniform(0, 1) < 0.5

    images = torch.where(coin(), images.flip(-1), images)
    images = torch.where(coin(), images.flip(-2), images)
    images = rotate(images, uniform(-1, 1).flatten() * MAX_ROTATION_DEGREES * strength)

    jitter = MAX_JITTER * strength
    images = images * uniform(1 - jitter, 1 + jitter)  # brightness
    grey = luminance(images)
    mean_grey = grey.mean(dim=(1, 2, 3), keepdim=True)
    images = (images - mean_grey) * uniform(1 - jitter, 1 + jitter) + mean_grey  # contrast
    grey = luminance(images)
    images = (images - grey) * uniform(1 - jitter, 1 + jitter) + grey  # saturation

    noise_std = uniform(0, MAX_NOISE_STD * strength)
    noise = torch.randn(images.shape, device=images.device, generator=generator, dtype=images.dtype)
    return (images + noise * noise_std).clamp_(0, 1)


def rotate(images: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """Rotate each image about its centre by its own angle; corners fill with black."""
    radians = degrees * (math.pi / 180)
    cos, sin = torch.cos(radians), torch.sin(radians)
    zero = torch.zeros_like(cos)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def luminance(images: torch.Tensor) -> torch.Tensor:
    weights = torch.tensor([0.299, 0.587, 0.114], device=images.device, dtype=images.dtype)
    return (images * weights.view(1, 3, 1, 1)).sum(dim=1, keepdim=True)
