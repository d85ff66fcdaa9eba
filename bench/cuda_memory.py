"""CUDA only: peak memory of one trial's training step, per model and batch size, at 224 px.

Uses search.study.gpu_share.probe_peak_memory -- the same probe as --gpus-per-trial auto, which
plans with what the caching allocator reserved; the allocated peak is shown beside it --
(AMP fp16 + GradScaler, channels_last, AdamW, two steps so that AdamW's state exists,
plus one evaluation batch), then shows what `auto` would choose on this GPU and on the
reference 8 GB card.
"""

from __future__ import annotations

import time

import torch

from search.study.gpu_share import GiB, GpuTooSmall, choose_gpu_fraction, probe_in_subprocess, probe_peak_memory

MODELS = ("cnn", "vit", "hybrid")
BATCHES = (16, 32)
IMG_SIZE = 224
NUM_CLASSES = 11
REFERENCE = (int(7.6 * GiB), 8 * GiB)
"""RTX 2070 Super: 8 GiB, of which ~7.6 GiB free with a desktop running."""


def run(device: torch.device, quick: bool = False) -> dict:
    if device.type != "cuda" or not torch.cuda.is_available():
        return {"skipped": "no CUDA"}
    out: dict = {"gpu": torch.cuda.get_device_name(0), "plans": {}}
    start = time.perf_counter()
    probe_in_subprocess("hybrid", NUM_CLASSES, max(BATCHES), IMG_SIZE)
    out["subprocess_probe_s"] = time.perf_counter() - start  # what `auto` adds to a study's start-up
    for model in MODELS:
        for batch in BATCHES:
            key = f"{model}_b{batch}"
            try:
                reserved = probe_peak_memory(model, NUM_CLASSES, batch, IMG_SIZE)  # what `auto` plans with
            except GpuTooSmall as error:
                out["plans"][key] = {"error": str(error)}
                continue
            allocated = torch.cuda.max_memory_allocated()  # since the probe reset the peak statistics
            free, total = torch.cuda.mem_get_info()
            out["plans"][key] = {
                "allocated_bytes": allocated,
                "reserved_bytes": reserved,
                "here": plan_or_error(reserved, free, total),
                "reference": plan_or_error(reserved, *REFERENCE),
            }
    return out


def plan_or_error(peak: int, free: int, total: int) -> dict:
    try:
        plan = choose_gpu_fraction(peak, free, total)
    except GpuTooSmall:
        return {"fraction": None, "trials": 0}
    return {"fraction": plan.fraction, "trials": plan.trials}
