"""The seed's augmentation, applied to whole batches on the trial's device.

Flips, rotation, colour jitter and Gaussian noise, each drawn per sample, in one
pass over a (B, 3, H, W) float batch in [0, 1]. Each has its own knob
(trainables.config: hflip, vflip, rotation_deg, color_jitter, noise_std), because
whether an augmentation preserves the label depends on the images: a mirrored chest
X-ray swaps the patient's left and right, an upside-down 6 is a 9. A knob at 0 turns
its augmentation off and costs nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def augment_batch(
    images: torch.Tensor,
    generator: torch.Generator | None = None,
    *,
    hflip: float = 0.0,
    vflip: float = 0.0,
    rotation_deg: float = 0.0,
    color_jitter: float = 0.0,
    noise_std: float = 0.0,
) -> torch.Tensor:
    """Augmented copy of a float batch in [0, 1]; the batch itself when every knob is 0 (or left out).

    hflip, vflip: probability of mirroring an image left-right, upside-down. rotation_deg:
    the largest angle either way. color_jitter: brightness, contrast and saturation factors
    in [1 - j, 1 + j]. noise_std: the largest σ of the Gaussian noise. The trainable passes
    `Hyperparameters.augmentation()`.
    """
    if not (hflip or vflip or rotation_deg or color_jitter or noise_std):
        return images
    draw = Draws(images.shape[0], images.device, images.dtype, generator)
    if hflip or vflip or rotation_deg:
        # Flips and rotation are one affine map: a single resampling pass per batch.
        # Drawn in the retired aug_strength's order (angle, then flips), so its configs replay as they trained.
        degrees = draw.uniform(-1, 1).mul_(rotation_deg) if rotation_deg else draw.zeros()
        images = warp(images, degrees, flip_x=draw.signs(hflip), flip_y=draw.signs(vflip))
    else:
        images = images.clone()  # what follows works in place: leave the caller's batch as it was
    if color_jitter:
        jitter_colours(images, draw, color_jitter)
    if noise_std:
        add_noise(images, draw, noise_std)
    return images.clamp_(0, 1)


@dataclass(frozen=True)
class Draws:
    """Per-sample random numbers for one batch, all from the trial's generator (so an epoch replays exactly)."""

    batch: int
    device: torch.device
    dtype: torch.dtype
    generator: torch.Generator | None

    def uniform(self, low: float, high: float) -> torch.Tensor:
        draw = torch.rand(self.batch, device=self.device, generator=self.generator, dtype=self.dtype)
        return low + (high - low) * draw

    def signs(self, probability: float) -> torch.Tensor:
        """-1 (flip) with `probability`, else +1, per sample; no draw at all when it is 0."""
        if not probability:
            return torch.ones(self.batch, device=self.device, dtype=self.dtype)
        return torch.where(self.uniform(0, 1) < probability, -1.0, 1.0).to(self.dtype)

    def zeros(self) -> torch.Tensor:
        return torch.zeros(self.batch, device=self.device, dtype=self.dtype)

    def per_image(self, low: float, high: float) -> torch.Tensor:
        """A uniform factor per image, shaped to broadcast over (B, C, H, W)."""
        return self.uniform(low, high).view(self.batch, 1, 1, 1)

    def normal(self, shape: torch.Size) -> torch.Tensor:
        return torch.randn(shape, device=self.device, generator=self.generator, dtype=self.dtype)


def jitter_colours(images: torch.Tensor, draw: Draws, jitter: float) -> None:
    """Brightness, contrast and saturation, each scaled by its own factor in [1 - jitter, 1 + jitter], in place.

    Luminance is linear in the pixels, so it is computed once and carried through
    brightness and contrast instead of being measured again.
    """
    grey = luminance(images)
    brightness = draw.per_image(1 - jitter, 1 + jitter)
    images.mul_(brightness)
    grey.mul_(brightness)
    mean_grey = grey.mean(dim=(1, 2, 3), keepdim=True)
    contrast = draw.per_image(1 - jitter, 1 + jitter)
    images.sub_(mean_grey).mul_(contrast).add_(mean_grey)
    grey.sub_(mean_grey).mul_(contrast).add_(mean_grey)
    images.sub_(grey).mul_(draw.per_image(1 - jitter, 1 + jitter)).add_(grey)  # saturation


def add_noise(images: torch.Tensor, draw: Draws, largest_std: float) -> None:
    """Gaussian noise, in place, with σ drawn per image in [0, largest_std]: some images stay nearly clean."""
    std = draw.per_image(0, largest_std)
    images.add_(draw.normal(images.shape).mul_(std))


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
