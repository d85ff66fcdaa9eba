"""What a model costs to train and to run: parameters, training throughput, peak memory, inference latency.

Measured on the device the comparison runs on, with random weights and random images:
time and memory depend on the shapes, not on the values, so no weights are downloaded
and every model (the reference too) is measured the same way. Training runs through the
engine's own Learner, so the throughput is what a trial sees (batched augmentation,
fp16 autocast and GradScaler on CUDA, AdamW's step), not a bare forward and backward.

torch is imported at the top: this module is only imported once the comparison needs torch.
"""

from __future__ import annotations

import gc
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from search.comparison.results import LATENCY_BATCHES, Costs
from trainables.config import Hyperparameters, SpeedOptions
from trainables.costs import inference_latency
from trainables.data import CachedSplit
from trainables.engine import Learner
from trainables.models import ModelSpec, build_model, count_parameters
from trainables.scoring import ScoringNetwork


def measure_costs(
    spec: ModelSpec,
    hp: Hyperparameters,
    device: torch.device,
    speed: SpeedOptions = SpeedOptions(),
    *,
    warmup: int = 2,
    repeats: int = 5,
    train_steps: int = 3,
) -> Costs:
    """The model's parameters, training throughput at hp.batch_size, peak training memory (CUDA only)
    and median inference latency per batch of LATENCY_BATCHES, measured on `device`.

    The weights are random (pretrained=False is forced): timing and memory do not depend on
    their values, and nothing needs downloading. Each timing is the median of `repeats`
    runs after `warmup` untimed ones (CUDA start-up, cuDNN autotuning, torch.compile); a
    training run is one epoch of `train_steps` batches. The memory is given back afterwards.
    """
    if warmup < 0 or repeats < 1 or train_steps < 1:
        raise ValueError(
            f"measure_costs: warmup must be >= 0, repeats and train_steps >= 1 "
            f"(got warmup={warmup}, repeats={repeats}, train_steps={train_steps})"
        )
    cuda = device.type == "cuda"
    autotune = torch.backends.cudnn.benchmark
    if cuda:
        torch.backends.cudnn.benchmark = speed.cudnn_benchmark  # as select_device sets it for a trial
    model = build_model(replace(spec, pretrained=False, weights_files=()))
    try:
        parameters = count_parameters(model)
        images_per_s, peak = training_throughput(
            model, spec, hp, device, speed, warmup=warmup, repeats=repeats, steps=train_steps
        )
        latency = {
            batch: inference_latency(model, batch, spec.img_size, device, speed, warmup=warmup, repeats=repeats)
            for batch in LATENCY_BATCHES
        }
    finally:
        del model
        release_memory(device)
        torch.backends.cudnn.benchmark = autotune
    return Costs(parameters, device.type, images_per_s, latency, peak)


def measure_ensemble_costs(
    members: Sequence[tuple[ModelSpec, Hyperparameters]],
    device: torch.device,
    speed: SpeedOptions = SpeedOptions(),
    *,
    warmup: int = 2,
    repeats: int = 5,
    train_steps: int = 3,
) -> Costs:
    """An ensemble's costs, each member measured as measure_costs measures a single model: the parameters summed;
    the training throughput of training every member on an image, one member after another (1 / the sum of
    1 / each member's images per second); the peak of the member that needs most; the inference latency of the
    scoring network the ensemble ships as (trainables.scoring: every member, its calibrated softmax, the average),
    with random weights as ever."""
    each = [
        measure_costs(spec, hp, device, speed, warmup=warmup, repeats=repeats, train_steps=train_steps)
        for spec, hp in members
    ]
    peaks = [costs.peak_train_memory for costs in each if costs.peak_train_memory is not None]
    networks = [build_model(replace(spec, pretrained=False, weights_files=())) for spec, _ in members]
    scoring = ScoringNetwork(networks, [1.0] * len(networks))  # the temperatures' values cost nothing to apply
    img_size = members[0][0].img_size
    try:
        latency = {
            batch: inference_latency(scoring, batch, img_size, device, speed, warmup=warmup, repeats=repeats)
            for batch in LATENCY_BATCHES
        }
    finally:
        del scoring, networks
        release_memory(device)
    return Costs(
        parameters=sum(costs.parameters for costs in each),
        device=device.type,
        train_images_per_s=1 / sum(1 / costs.train_images_per_s for costs in each),
        latency_ms=latency,
        peak_train_memory=max(peaks) if peaks else None,
    )


def training_throughput(
    model: nn.Module,
    spec: ModelSpec,
    hp: Hyperparameters,
    device: torch.device,
    speed: SpeedOptions,
    *,
    warmup: int,
    repeats: int,
    steps: int,
) -> tuple[float, int | None]:
    """(images per second, peak CUDA bytes or None on the CPU) of the engine's training epochs.

    The peak is max_memory_allocated over the timed epochs less what was allocated before the
    model went onto the device: weights, gradients, AdamW's state and activations in a steady
    state. The peak statistics are reset after the warm-up, so cuDNN's one-off autotuning
    workspaces are left out.
    """
    cuda = device.type == "cuda"
    count = steps * hp.batch_size
    learner = None
    with tempfile.TemporaryDirectory(prefix="costs-") as tmp:
        split = random_split(Path(tmp), count, spec.img_size, spec.num_classes)
        try:
            before = settled_allocation(device) if cuda else 0
            learner = Learner(model, hp, device, speed=speed)
            for _ in range(warmup):
                learner.train_epoch(split)
            if cuda:
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            seconds = []
            for _ in range(repeats):
                start = time.perf_counter()
                learner.train_epoch(split)
                if cuda:
                    torch.cuda.synchronize(device)
                seconds.append(time.perf_counter() - start)
            peak = int(torch.cuda.max_memory_allocated(device) - before) if cuda else None
        finally:
            del learner  # AdamW's state goes with it; the model stays for the latency
            release_memory(device)
    return count / statistics.median(seconds), peak


def random_split(folder: Path, count: int, img_size: int, num_classes: int) -> CachedSplit:
    """A memory-mapped split of `count` random uint8 images, as the trials read their cached data."""
    path = folder / "images.npy"
    images = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(count, img_size, img_size, 3))
    images[:] = np.random.default_rng(0).integers(0, 256, images.shape, dtype=np.uint8)
    images.flush()
    del images
    return CachedSplit(str(path), np.arange(count, dtype=np.int64) % num_classes)


def settled_allocation(device: torch.device) -> int:
    """CUDA bytes allocated once what is already freed has been collected: the baseline of a peak."""
    release_memory(device)
    torch.cuda.synchronize(device)
    return torch.cuda.memory_allocated(device)


def release_memory(device: torch.device) -> None:
    """Collect what was freed and, on CUDA, hand the cached blocks back: the next model measures alone."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
