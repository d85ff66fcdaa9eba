import pytest
import torch

from trainables.augment import augment_batch, luminance, warp
from trainables.config import AUGMENTS, DEFAULTS, from_aug_strength

EVERYTHING = {"hflip": 0.5, "vflip": 0.5, "rotation_deg": 30.0, "color_jitter": 0.4, "noise_std": 0.05}


def batch(n: int = 8, size: int = 16) -> torch.Tensor:
    # A bright square off-centre, so flips and rotations move it.
    images = torch.zeros(n, 3, size, size)
    images[:, :, 2:6, 3:7] = 1.0
    return images


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_every_knob_at_zero_returns_the_batch_itself():
    images = batch()
    assert augment_batch(images) is images
    assert augment_batch(images, seeded(), **{name: 0.0 for name in AUGMENTS}) is images


def test_hflip_alone_mirrors_left_right_and_does_nothing_else():
    images = torch.rand(4, 3, 8, 8)
    assert torch.allclose(augment_batch(images, seeded(), hflip=1.0), images.flip(-1), atol=1e-5)


def test_vflip_alone_turns_upside_down_and_does_nothing_else():
    images = torch.rand(4, 3, 8, 8)
    assert torch.allclose(augment_batch(images, seeded(), vflip=1.0), images.flip(-2), atol=1e-5)


def test_with_vflip_at_zero_no_image_is_ever_upside_down():
    images = torch.rand(32, 3, 8, 8)
    out = augment_batch(images, seeded(), hflip=0.5)
    kept = [torch.allclose(o, i, atol=1e-5) for o, i in zip(out, images, strict=True)]
    mirrored = [torch.allclose(o, i.flip(-1), atol=1e-5) for o, i in zip(out, images, strict=True)]
    assert all(k or m for k, m in zip(kept, mirrored, strict=True))  # never flipped upside-down, nothing else done
    assert any(kept) and any(mirrored)  # p = 0.5: both happen


def test_the_defaults_keep_images_upright():
    # A top-heavy image stays top-heavy: rotation up to 15 degrees, jitter and noise move little, no vflip.
    images = torch.zeros(32, 3, 16, 16)
    images[:, :, 1:6, 4:12] = 1.0
    out = augment_batch(images, seeded(), **DEFAULTS.augmentation())
    assert bool((out[:, :, :8].sum(dim=(1, 2, 3)) > 2 * out[:, :, 8:].sum(dim=(1, 2, 3))).all())


def centroid_angle_and_radius(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image: the angle (degrees) and distance of its brightness centroid from the centre."""
    mass = images.mean(dim=1)
    size = images.shape[-1]
    coords = torch.arange(size, dtype=images.dtype) - (size - 1) / 2
    y = (mass.sum(dim=2) * coords).sum(dim=1) / mass.sum(dim=(1, 2))
    x = (mass.sum(dim=1) * coords).sum(dim=1) / mass.sum(dim=(1, 2))
    return torch.rad2deg(torch.atan2(y, x)), torch.hypot(x, y)


def test_rotation_alone_turns_each_image_within_its_range_and_does_nothing_else():
    images = torch.zeros(16, 3, 32, 32)
    images[:, :, 5:10, 7:12] = 1.0
    out = augment_batch(images, seeded(), rotation_deg=20.0)
    before_angle, before_radius = centroid_angle_and_radius(images)
    after_angle, after_radius = centroid_angle_and_radius(out)
    turned = after_angle - before_angle
    assert bool((turned.abs() <= 20.0 + 1.0).all())  # within the range (1 degree: resampling)
    assert turned.abs().max() > 5.0 and len(set(turned.round().tolist())) > 4  # and drawn per image
    assert torch.allclose(after_radius, before_radius, rtol=0.03)  # a turn, not a mirror or a shift
    assert torch.equal(out[:, 0], out[:, 1])  # colours untouched


def test_colour_jitter_alone_keeps_the_pixels_in_place_and_grey_images_grey():
    images = batch(16) * 0.4  # a dim square: no factor pushes it to the clamp
    out = augment_batch(images, seeded(), color_jitter=0.4)
    square = out[:, :, 2:6, 3:7].amin(dim=(1, 2, 3))
    background = out[:, :, 8:, 8:].amax(dim=(1, 2, 3))
    assert bool((square > background).all())  # nothing moved
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 1], out[:, 2])  # grey stays grey
    assert len(set(out[:, 0, 3, 4].tolist())) == 16  # a factor per image
    assert images[:, :, 2:6, 3:7].eq(0.4).all()  # the caller's batch is left alone


def test_colour_jitter_keeps_values_in_range():
    out = augment_batch(torch.rand(16, 3, 8, 8), seeded(), color_jitter=1.0)
    assert out.min() >= 0.0 and out.max() <= 1.0


def test_noise_alone_has_each_image_s_sigma_within_noise_std():
    images = torch.full((32, 3, 32, 32), 0.5)  # mid-grey: 0.05 of noise never reaches the clamp
    out = augment_batch(images, seeded(), noise_std=0.05)
    noise = (out - images).flatten(1)
    sigma = noise.std(dim=1)
    assert bool((sigma <= 0.05 * 1.1).all())  # 1.1: the spread of a sample of 3,072 pixels
    assert sigma.min() < 0.02 and sigma.max() > 0.035  # each image draws its own σ in [0, noise_std]
    assert noise.mean().abs() < 1e-3


def test_all_together_keeps_shape_and_range_and_each_sample_differs():
    out = augment_batch(batch(), seeded(), **EVERYTHING)
    assert out.shape == (8, 3, 16, 16)
    assert out.min() >= 0.0 and out.max() <= 1.0
    flat = out.flatten(1)
    assert all(not torch.allclose(flat[0], flat[i]) for i in range(1, 8))  # per-sample randomness


def test_seeded_generator_repeats_exactly():
    assert torch.equal(augment_batch(batch(), seeded(3), **EVERYTHING), augment_batch(batch(), seeded(3), **EVERYTHING))


def rotate(images: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    ones = torch.ones_like(degrees)  # no flips
    return warp(images, degrees, ones, ones)


def test_rotation_by_zero_keeps_and_by_90_turns_the_image():
    images = batch(2)
    assert torch.allclose(rotate(images, torch.zeros(2)), images, atol=1e-5)
    turned = rotate(images, torch.full((2,), 90.0))
    assert torch.allclose(turned, torch.rot90(images, k=-1, dims=(2, 3)), atol=1e-4) or torch.allclose(
        turned, torch.rot90(images, k=1, dims=(2, 3)), atol=1e-4
    )


def test_flips_are_folded_into_the_warp():
    images = torch.rand(2, 3, 8, 8)
    zero, plus, minus = torch.zeros(2), torch.ones(2), -torch.ones(2)
    assert torch.allclose(warp(images, zero, minus, plus), images.flip(-1), atol=1e-5)
    assert torch.allclose(warp(images, zero, plus, minus), images.flip(-2), atol=1e-5)


@pytest.mark.parametrize("strength", [0.0, 0.3, 0.5, 1.0])
def test_an_old_aug_strength_augments_as_it_did(strength):
    """from_aug_strength's knobs draw what the retired augment_batch(images, strength) drew."""
    images = torch.rand(8, 3, 16, 16)
    new = augment_batch(images, seeded(5), **from_aug_strength(strength))
    assert torch.allclose(new, retired_augment_batch(images, strength, seeded(5)), atol=1e-5)


def retired_augment_batch(images: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """augment_batch before one knob per augmentation (commit 3ab3f64), kept as the reference."""
    if strength <= 0:
        return images
    count = images.shape[0]

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(count, generator=generator, dtype=images.dtype)

    def sign() -> torch.Tensor:
        return torch.where(uniform(0, 1) < 0.5, -1.0, 1.0).to(images.dtype)

    degrees = uniform(-1, 1) * 30.0 * strength
    images = warp(images, degrees, flip_x=sign(), flip_y=sign())
    jitter = 0.4 * strength

    def factor() -> torch.Tensor:
        return uniform(1 - jitter, 1 + jitter).view(count, 1, 1, 1)

    grey = luminance(images)
    brightness = factor()
    images.mul_(brightness)
    grey.mul_(brightness)
    mean_grey = grey.mean(dim=(1, 2, 3), keepdim=True)
    contrast = factor()
    images.sub_(mean_grey).mul_(contrast).add_(mean_grey)
    grey.sub_(mean_grey).mul_(contrast).add_(mean_grey)
    images.sub_(grey).mul_(factor()).add_(grey)
    noise_std = uniform(0, 0.05 * strength).view(count, 1, 1, 1)
    noise = torch.randn(images.shape, generator=generator, dtype=images.dtype)
    return images.add_(noise.mul_(noise_std)).clamp_(0, 1)
