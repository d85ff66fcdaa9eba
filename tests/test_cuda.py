"""CUDA-only checks: AMP, channels_last, the per-process memory cap and the GPU memory probe.

Every test here is marked `cuda` and skipped where no CUDA GPU is visible. On a GPU
machine: `python -m pytest -m cuda tests/test_cuda.py`. Sizes are small (32-64 px,
tiny batches, a 2-block ViT) so the whole file runs in about a minute.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.cuda import CUDA_MARKS
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
NUM_CLASSES = 4

pytestmark = list(CUDA_MARKS)


def random_split(folder: Path, count: int, size: int):
    """A CachedSplit of `count` random uint8 images, labels cycling through the classes."""
    from trainables.data import CachedSplit

    path = folder / f"images-{count}-{size}px.npy"
    images = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(count, size, size, 3))
    images[:] = np.random.default_rng(0).integers(0, 256, images.shape, dtype=np.uint8)
    images.flush()
    del images
    return CachedSplit(str(path), (np.arange(count) % NUM_CLASSES).astype(np.int64))


def cuda_learner(model_name: str, speed, batch_size: int = 8, img_size: int = 32):
    from trainables.config import Hyperparameters
    from trainables.engine import Learner
    from trainables.models import ModelSpec, build_model

    knobs = {"vit_depth": 2} if model_name == "vit" else {}
    torch.manual_seed(0)
    model = build_model(ModelSpec(model_name, NUM_CLASSES, img_size, pretrained=False, **knobs))
    return Learner(model, Hyperparameters(lr=1e-3, batch_size=batch_size), torch.device("cuda"), speed=speed)


def last_linear(model: nn.Module) -> nn.Linear:
    return [module for module in model.modules() if isinstance(module, nn.Linear)][-1]


def train_and_watch_the_head(learner, split) -> tuple[float, set[torch.dtype]]:
    """One training epoch: its loss, and the dtypes the head's last Linear produced meanwhile."""
    dtypes = []
    hook = last_linear(learner.model).register_forward_hook(
        lambda _module, _inputs, output: dtypes.append(output.dtype)
    )
    try:
        loss = learner.train_epoch(split)
    finally:
        hook.remove()
    return loss, set(dtypes)


def conv_weights(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [(name, p) for name, p in model.named_parameters() if p.dim() == 4]


def layout_decides(weight: torch.Tensor) -> bool:
    """NCHW and NHWC differ in memory only with several input channels and a spatial kernel
    (a 1x1 or depthwise kernel is contiguous in both layouts)."""
    return weight.shape[1] > 1 and weight.shape[2] * weight.shape[3] > 1


# ---------------------------------------------------------------- AMP


@pytest.mark.parametrize("model_name", ["cnn", "vit"])
def test_amp_trains_in_fp16_autocast_with_an_enabled_grad_scaler(model_name, tmp_path):
    from trainables.config import SpeedOptions

    learner = cuda_learner(model_name, SpeedOptions(amp=True))
    assert learner.amp and learner.scaler.is_enabled()
    loss, dtypes = train_and_watch_the_head(learner, random_split(tmp_path, 24, 32))
    assert math.isfinite(loss) and loss > 0
    assert dtypes == {torch.float16}  # the head ran under fp16 autocast
    assert all(p.dtype == torch.float32 for p in learner.model.parameters())  # master weights stay fp32
    assert learner.scaler.get_scale() > 0


def test_without_amp_the_scaler_is_off_and_training_runs_in_fp32(tmp_path):
    from trainables.config import SpeedOptions

    learner = cuda_learner("vit", SpeedOptions(amp=False))
    assert not learner.amp and not learner.scaler.is_enabled()
    loss, dtypes = train_and_watch_the_head(learner, random_split(tmp_path, 24, 32))
    assert math.isfinite(loss) and dtypes == {torch.float32}


# ---------------------------------------------------------------- channels_last


def test_channels_last_puts_conv_weights_and_batches_in_nhwc(tmp_path):
    from trainables.config import SpeedOptions

    learner = cuda_learner("cnn", SpeedOptions(channels_last=True))
    weights = conv_weights(learner.model)
    assert weights, "the CNN has no 4-D convolution weights"
    assert [name for name, p in weights if not p.is_contiguous(memory_format=torch.channels_last)] == []
    decisive = [p for _, p in weights if layout_decides(p)]
    assert decisive and not any(p.is_contiguous() for p in decisive)  # really NHWC, not NCHW that also passes

    split = random_split(tmp_path, 16, 32)
    batches = learner.batches(split, np.arange(len(split)), 8)
    try:
        images, _ = next(batches)
    finally:
        batches.close()
    assert images.is_cuda and images.is_contiguous(memory_format=torch.channels_last)
    assert math.isfinite(learner.train_epoch(split))
    assert all(p.is_contiguous(memory_format=torch.channels_last) for _, p in conv_weights(learner.model))


def test_without_channels_last_conv_weights_stay_nchw():
    from trainables.config import SpeedOptions

    learner = cuda_learner("cnn", SpeedOptions(channels_last=False))
    decisive = [p for _, p in conv_weights(learner.model) if layout_decides(p)]
    assert decisive and all(
        p.is_contiguous() and not p.is_contiguous(memory_format=torch.channels_last) for p in decisive
    )


# ---------------------------------------------------------------- the memory cap

CAP_SCRIPT = """
import torch
from trainables.engine import select_device
from trainables.gpu_memory import CUDA_CONTEXT_BYTES

device = select_device(0.2)
assert device.type == "cuda", device
total = torch.cuda.get_device_properties(device).total_memory
inside = torch.empty(int(total * 0.01), dtype=torch.uint8, device=device)  # well inside the cap
del inside
try:  # inside the share, but not once the CUDA context (outside the allocator) is counted in it
    over = torch.empty(int(total * 0.2) - CUDA_CONTEXT_BYTES // 2, dtype=torch.uint8, device=device)
except torch.cuda.OutOfMemoryError:
    print("capped")
else:
    print("not-capped", torch.cuda.memory_allocated(device))
select_device(1.0)  # lift the cap: the same allocation now fits, so the error above was the cap's
over = torch.empty(int(total * 0.2) - CUDA_CONTEXT_BYTES // 2, dtype=torch.uint8, device=device)
print("lifted")
"""


def test_select_device_caps_the_process_allocator_to_its_share_less_the_cuda_context():
    # A process of its own: the cap is per process and must not leak into the other tests.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(
        [sys.executable, "-c", CAP_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["capped", "lifted"], done.stdout + done.stderr[-3000:]


# ---------------------------------------------------------------- the probe


def test_probe_peak_is_positive_below_total_and_grows_with_the_batch():
    from search.study.gpu_share import probe_peak_memory

    total = torch.cuda.get_device_properties(0).total_memory
    small = probe_peak_memory("cnn", NUM_CLASSES, 4, 64)
    large = probe_peak_memory("cnn", NUM_CLASSES, 32, 64)
    assert 0 < small < large < total, (small, large, total)


def test_probe_measures_what_the_allocator_reserved_not_only_what_tensors_allocated():
    from search.study.gpu_share import probe_peak_memory

    peak = probe_peak_memory("cnn", NUM_CLASSES, 16, 64)
    # The probe reset the peak statistics when it started: what tensors held at most since then.
    allocated = torch.cuda.max_memory_allocated(0) - torch.cuda.memory_allocated(0)
    assert peak >= allocated > 0, (peak, allocated)


def test_probe_in_a_spawned_process_returns_peak_free_and_total():
    from search.study.gpu_share import probe_in_subprocess

    peak, free, total = probe_in_subprocess("vit", NUM_CLASSES, 8, 32, vit_depth=2)
    assert all(isinstance(value, int) for value in (peak, free, total))
    assert 0 < peak < free <= total, (peak, free, total)
    assert total == pytest.approx(torch.cuda.get_device_properties(0).total_memory, rel=0.02)


# ---------------------------------------------------------------- class weighting


def test_class_weights_train_under_amp(tmp_path):
    """fp16 logits and float32 class weights: autocast runs cross_entropy in float32, so a weighted loss trains."""
    from dataclasses import replace

    from trainables.config import SpeedOptions

    learner = cuda_learner("vit", SpeedOptions())
    learner.hp = replace(learner.hp, class_weighting="inverse")
    assert math.isfinite(learner.train_epoch(random_split(tmp_path, 32, 32)))
    weight = learner.loss_fn.weight
    assert weight is not None and weight.device.type == "cuda" and weight.dtype == torch.float32
