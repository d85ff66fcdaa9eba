import torch

from trainables.augment import augment_batch, warp


def batch(n: int = 8, size: int = 16) -> torch.Tensor:
    # A bright square off-centre, so flips and rotations move it.
    images = torch.zeros(n, 3, size, size)
    images[:, :, 2:6, 3:7] = 1.0
    return images


def test_zero_strength_is_identity():
    images = batch()
    assert augment_batch(images, 0.0) is images


def test_shape_and_range_are_kept_and_each_sample_differs():
    out = augment_batch(batch(), 1.0, torch.Generator().manual_seed(0))
    assert out.shape == (8, 3, 16, 16)
    assert out.min() >= 0.0 and out.max() <= 1.0
    flat = out.flatten(1)
    assert all(not torch.allclose(flat[0], flat[i]) for i in range(1, 8))  # per-sample randomness


def test_seeded_generator_repeats_exactly():
    first = augment_batch(batch(), 0.7, torch.Generator().manual_seed(3))
    second = augment_batch(batch(), 0.7, torch.Generator().manual_seed(3))
    assert torch.equal(first, second)


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


def test_colour_jitter_keeps_grey_images_grey():
    grey = torch.rand(4, 1, 16, 16).expand(4, 3, 16, 16).contiguous()
    out = augment_batch(grey, 1.0, torch.Generator().manual_seed(0))
    # Noise is per channel; without it the channels would agree. Their spread stays noise-sized.
    assert (out[:, 0] - out[:, 1]).abs().mean() < 0.08
