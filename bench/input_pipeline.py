"""Input pipeline: images/s into a trial, the project's path against a plain torchvision one.

Project: JPEGs decoded once into the uint8 cache (one-time cost, reported apart), then
per epoch `Learner.batches` (memory-mapped gather in a prefetch thread -> device ->
float NCHW) followed by `augment_batch` on the device.

Baseline: torchvision `ImageFolder` + PIL + per-sample `transforms.v2` (Resize 224,
both flips, rotation, colour jitter, to float, Gaussian noise) in a `DataLoader` with
the same number of workers, batches moved to the same device.

Both at 224 px, batch 32, the same generated ~512 px JPEGs, the same augmentation
magnitudes (AUGMENTATION: both flips, rotation 30 degrees, jitter 0.4, noise std 0.05).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import NUM_WORKERS, synchronize, write_jpeg_folder
from torch import nn

from trainables.augment import augment_batch
from trainables.config import Hyperparameters
from trainables.data import DatasetIndex, cache_split, index_source
from trainables.engine import Learner

IMG_SIZE = 224
BATCH = 32
AUGMENTATION = {"hflip": 0.5, "vflip": 0.5, "rotation_deg": 30.0, "color_jitter": 0.4, "noise_std": 0.05}
"""Every augmentation on, at the magnitudes the torchvision baseline uses (the retired aug_strength 1, which
earlier results of this benchmark measured)."""


def run(
    device: torch.device,
    quick: bool = False,
    images: int | None = None,
    epochs: int | None = None,
    workers: int = NUM_WORKERS,
) -> dict:
    """workers: the baseline's DataLoader workers, and the torch threads the project's path may use."""
    count = images or (128 if quick else 512)
    epochs = epochs or (1 if quick else 3)
    torch.set_num_threads(workers)
    with tempfile.TemporaryDirectory(prefix="bench-input-") as tmp:
        folder = write_jpeg_folder(Path(tmp) / "jpegs", count, size=512)
        out = {"images": count, "epochs": epochs, "batch": BATCH, "img_size": IMG_SIZE, "workers": workers}
        out.update(project_path(folder, Path(tmp) / "cache", device, epochs))
        out.update(torchvision_path(folder, device, epochs, workers))
    out["augment_only_img_s"] = augment_only(device, iterations=4 if quick else (100 if device.type == "cuda" else 10))
    out["ratio"] = out["project_img_s"] / out["torchvision_img_s"]
    return out


# ---------------------------------------------------------------- this project


def whole_folder(folder: Path) -> DatasetIndex:
    """Every image of the folder in one split, so both paths see the same files."""
    index = index_source(folder, seed=0)
    samples = sorted((s for split in index.splits.values() for s in split), key=lambda s: s.key)
    return DatasetIndex(index.source, index.classes, {"all": samples})


def project_path(folder: Path, cache_dir: Path, device: torch.device, epochs: int) -> dict:
    index = whole_folder(folder)
    start = time.perf_counter()
    split = cache_split(index, "all", IMG_SIZE, cache_dir)
    build = time.perf_counter() - start

    # Learner.batches needs only the device; a one-layer model keeps construction free.
    learner = Learner(nn.Linear(1, 1), Hyperparameters(batch_size=BATCH), device)
    generator = torch.Generator(device=device).manual_seed(0)

    def epoch(number: int, augment: bool = True, limit: int | None = None) -> float:
        order = np.random.default_rng(number).permutation(len(split))[:limit]
        synchronize(device)
        start = time.perf_counter()
        for images, _labels in learner.batches(split, order, BATCH, drop_single=True):
            if augment:
                images = augment_batch(images, generator, **AUGMENTATION)
        synchronize(device)
        return time.perf_counter() - start

    epoch(1000, limit=2 * BATCH)  # warm-up: allocator, kernels, prefetch thread
    seconds = [epoch(n) for n in range(epochs)]
    batches_only = [epoch(n, augment=False) for n in range(epochs)]
    return {
        "cache_build_s": build,
        "project_epoch_s": float(np.median(seconds)),
        "project_img_s": len(split) / float(np.median(seconds)),
        "batches_only_img_s": len(split) / float(np.median(batches_only)),
    }


def augment_only(device: torch.device, iterations: int) -> float:
    """augment_batch alone on a float batch already on the device (the GPU goal: >= 3,000 img/s)."""
    images = torch.rand(BATCH, 3, IMG_SIZE, IMG_SIZE, device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    for _ in range(2):
        augment_batch(images, generator, **AUGMENTATION)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(iterations):
        augment_batch(images, generator, **AUGMENTATION)
    synchronize(device)
    return BATCH * iterations / (time.perf_counter() - start)


# ---------------------------------------------------------------- torchvision baseline


def baseline_transform():
    from torchvision.transforms import v2

    sigma, jitter = AUGMENTATION["noise_std"], AUGMENTATION["color_jitter"]
    noise = (
        v2.GaussianNoise(mean=0.0, sigma=sigma)
        if hasattr(v2, "GaussianNoise")
        else v2.Lambda(lambda x: (x + torch.randn_like(x) * sigma).clamp(0, 1))
    )
    return v2.Compose(
        [
            v2.Resize((IMG_SIZE, IMG_SIZE), antialias=True),
            v2.RandomHorizontalFlip(AUGMENTATION["hflip"]),
            v2.RandomVerticalFlip(AUGMENTATION["vflip"]),
            v2.RandomRotation(AUGMENTATION["rotation_deg"]),
            v2.ColorJitter(brightness=jitter, contrast=jitter, saturation=jitter),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            noise,
        ]
    )


def torchvision_path(folder: Path, device: torch.device, epochs: int, workers: int) -> dict:
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    dataset = ImageFolder(str(folder), transform=baseline_transform())
    loader = DataLoader(
        dataset,
        batch_size=BATCH,
        shuffle=True,
        num_workers=workers,
        drop_last=False,
        pin_memory=device.type == "cuda",
        persistent_workers=True,
        generator=torch.Generator().manual_seed(0),
    )

    def epoch() -> float:
        synchronize(device)
        start = time.perf_counter()
        for images, labels in loader:
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
        synchronize(device)
        return time.perf_counter() - start

    first = epoch()  # includes starting the workers
    seconds = [epoch() for _ in range(epochs)]
    loader = None  # stops its workers: epoch() is done with it
    return {
        "torchvision_first_epoch_s": first,
        "torchvision_epoch_s": float(np.median(seconds)),
        "torchvision_img_s": len(dataset) / float(np.median(seconds)),
    }
