"""What a model costs, as a trial measures it for a multi-objective study and compare.py measures it for its table.

The names, units and directions are trainables.config.COSTS; this module measures. Each trial
reports its parameters (free), its peak CUDA memory (a counter the allocator keeps anyway) and,
when the study trades accuracy against it, its inference latency (a few forward passes, once).
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from trainables.config import COSTS, SpeedOptions
from trainables.models import count_parameters

LATENCY_WARMUP, LATENCY_REPEATS = 3, 10
"""A trial's latency: the median of this many timed batch-1 passes after the untimed ones."""


def inference_latency(
    model: nn.Module, batch: int, img_size: int, device: torch.device, speed: SpeedOptions, *, warmup: int, repeats: int
) -> float:
    """Median milliseconds for one forward pass of `batch` random [0, 1] images already on the device.

    Run as deployment would: eval mode, no autograd, and on CUDA the same fp16 autocast and
    channels_last layout that training used when `speed` asks for them. The images come from a
    generator of their own, so that a trial measuring mid-training draws nothing from its
    training's random streams.
    """
    cuda = device.type == "cuda"
    memory_format = torch.channels_last if cuda and speed.channels_last else torch.contiguous_format
    model = model.to(device).to(memory_format=memory_format).eval()
    generator = torch.Generator(device=device).manual_seed(0)
    images = torch.rand(batch, 3, img_size, img_size, device=device, generator=generator)
    images = images.contiguous(memory_format=memory_format)
    seconds = []
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.float16, enabled=cuda and speed.amp):
        if cuda:
            torch.cuda.synchronize(device)
        for call in range(warmup + repeats):
            start = time.perf_counter()
            model(images)
            if cuda:
                torch.cuda.synchronize(device)
            if call >= warmup:
                seconds.append(time.perf_counter() - start)
    del images
    return 1000 * statistics.median(seconds)


def parameter_cost(model: nn.Module) -> dict[str, float]:
    """{params_m: parameters in millions}: free, so every trial of every study reports it."""
    return {COSTS["params"].metric: count_parameters(model) / 1e6}


def latency_cost(model: nn.Module, img_size: int, device: torch.device, speed: SpeedOptions) -> dict[str, float]:
    """{latency_ms: one image's inference on the trial's device}. The caller puts the model back in train mode
    (Learner.train_epoch does, first thing)."""
    latency = inference_latency(model, 1, img_size, device, speed, warmup=LATENCY_WARMUP, repeats=LATENCY_REPEATS)
    return {COSTS["latency"].metric: latency}


def memory_cost(device: torch.device) -> dict[str, float]:
    """{peak_memory_mb: the most CUDA memory this process allocated since the trial began}; {} on the CPU.

    The trial resets the peak when it starts (reset_peak_memory_stats): Ray reuses a trial's process
    for the next trial, and each trial has a process of its own on the GPU, so the peak is this trial's.
    """
    if device.type != "cuda":
        return {}
    return {COSTS["memory"].metric: torch.cuda.max_memory_allocated(device) / 2**20}
