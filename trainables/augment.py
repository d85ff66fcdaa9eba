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
        return low + (high - low) * draw

    def sign() -> torch.Tensor:  # -1 (flip) or +1, each with probability 0.5
        return torch.where(uniform(0, 1) < 0.5, -1.0, 1.0).to(images.dtype)

    # Flips and rotation are one affine map: a single resampling pass per batch.
    degrees = uniform(-1, 1) * MAX_ROTATION_DEGREES * strength
    images = warp(images, degrees, flip_x=sign(), flip_y=sign())

    # Colour jitter. Luminance is linear in the pixels, so it is computed once and
    # carried through brightness and contrast instead of being measured again.
    jitter = MAX_JITTER * strength

    def factor() -> torch.Tensor:
        return uniform(1 - jitter, 1 + jitter).view(batch, 1, 1, 1)

    grey = luminance(images)
    brightness = factor()
    images.mul_(brightness)
    grey.mul_(brightness)
    mean_grey = grey.mean(dim=(1, 2, 3), keepdim=True)
    contrast = factor()
    images.sub_(mean_grey).mul_(contrast).add_(mean_grey)
    grey.sub_(mean_grey).mul_(contrast).add_(mean_grey)
    images.sub_(grey).mul_(factor()).add_(grey)  # saturation

    noise_std = uniform(0, MAX_NOISE_STD * strength).view(batch, 1, 1, 1)
    noise = torch.randn(images.shape, device=images.device, generator=generator, dtype=images.dtype)
    return images.add_(noise.mul_(noise_std)).clamp_(0, 1)


def warp(images: torch.Tensor, degrees: torch.Tensor, flip_x: torch.Tensor, flip_y: torch.Tensor) -> torch.Tensor:
    """Rotate each image about its centre by its own angle after flipping it where
    flip_x / flip_y is -1; corners fill with black."""
    radians = degrees * (math.pi / 180)
    cos, sin = torch.cos(radians), torch.sin(radians)
    zero = torch.zeros_like(cos)
    theta = torch.stack(
        [torch.stack([cos * flip_x, -sin * flip_y, zero], 1), torch.stack([sin * flip_x, cos * flip_y, zero], 1)], 1
    )
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def luminance(images: torch.Tensor) -> torch.Tensor:
    weights = torch.tensor([0.299, 0.587, 0.114], device=images.device, dtype=images.dtype)
    return (images * weights.view(1, 3, 1, 1)).sum(dim=1, keepdim=True)
