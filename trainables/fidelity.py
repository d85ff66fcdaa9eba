"""Resolution as a fidelity: which image size each epoch of a trial trains and validates at, and what it costs.

ASHA decides at its rungs (grace_period * reduction_factor**k epochs) whether a trial goes on. With
resolution as the fidelity, the epochs that lead up to the first two rungs run at smaller images, so the
decisions that stop most trials cost a fraction of full epochs; every trial has the same schedule, so a rung
compares like with like. Pure arithmetic, standard library only.
"""

from __future__ import annotations

COMPUTE_EPOCHS = "compute_epochs"
"""A trial's result key: its compute so far in full-resolution epochs (each epoch weighted by the images it
trained on over the training split's and by (its image size / the study's)**2)."""
EPOCH_IMG_SIZE = "epoch_img_size"
"""A trial's result key: the image size the epoch trained and validated at."""
SIZE_STEP = 16
"""Reduced sizes are multiples of the ViT's patch, so every model takes them."""
REDUCED_FRACTIONS = (1 / 2, 3 / 4)
"""The size of the epochs up to the first rung, then up to the second; later epochs run at the full size."""


def asha_rungs(epochs: int, grace_period: int, reduction_factor: int) -> list[int]:
    """The epochs at which ASHA compares trials before the budget ends: grace_period * reduction_factor**k below
    max_t = epochs (a rung at max_t decides nothing: every trial stops there)."""
    rungs, rung = [], max(grace_period, 1)
    while rung < epochs:
        rungs.append(rung)
        rung *= reduction_factor
    return rungs


def reduced_size(img_size: int, fraction: float) -> int:
    """`fraction` of img_size rounded down to a multiple of SIZE_STEP, at least SIZE_STEP, at most img_size."""
    size = max(SIZE_STEP, int(img_size * fraction) // SIZE_STEP * SIZE_STEP)
    return min(size, img_size)


def resolution_schedule(img_size: int, epochs: int, grace_period: int, reduction_factor: int) -> tuple[int, ...]:
    """The image size of epochs 1..epochs: half of img_size up to and including ASHA's first rung, three quarters
    up to and including its second, img_size after. Only epochs that a rung below the budget follows are reduced:
    the epochs after the last such rung decide nothing cheaply, and the last epoch is always at img_size.

    224 px, 15 epochs, grace 2, factor 3: epochs 1-2 at 112, 3-6 at 160, 7-15 at 224.
    """
    rungs = asha_rungs(epochs, grace_period, reduction_factor)
    sizes = []
    for epoch in range(1, epochs + 1):
        stage = sum(epoch > rung for rung in rungs)  # rungs passed before this epoch
        reduced = stage < min(len(rungs), len(REDUCED_FRACTIONS))
        sizes.append(reduced_size(img_size, REDUCED_FRACTIONS[stage]) if reduced else img_size)
    return tuple(sizes)


def epoch_compute(trained_images: int, split_images: int, size: int, img_size: int) -> float:
    """One epoch's compute in full-resolution epochs: the share of the training split it trained on, times the
    pixels of its images over the full size's."""
    return trained_images / max(split_images, 1) * (size / img_size) ** 2
