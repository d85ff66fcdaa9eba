"""Trainable efficiency: one trial's whole epoch against a bare training loop.

Whole epoch: what `train_trial` does minus `tune.report` -- `fit` from the engine
(cache -> batches -> augmentation -> AMP step, then evaluation, scheduler, early-stop
state) plus `save_trial_checkpoint(...)` every epoch.

Bare loop: forward / backward / optimizer step on one random tensor of the same shape,
with the same model, optimizer, AMP, memory format and device (the Learner's own).

The ratio counts the evaluation images in the whole epoch's throughput (images the
epoch pushed through the model over its wall time); the stricter ratio counting only
training images is reported too.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import Stopwatch, synchronize, write_array_split

from trainables.checkpoint import save_trial_checkpoint
from trainables.config import Hyperparameters
from trainables.engine import Learner, fit, select_device
from trainables.models import ModelSpec, build_model

NUM_CLASSES = 11

# (train images, val images, batch, measured epochs): small on a CPU, where a ViT step
# at 224 px takes seconds (--quick: one step per epoch, a smoke check more than a
# measurement), and enough batches on a GPU to reach a steady state.
SIZES = {
    ("cpu", False): (64, 32, 16, 2),
    ("cpu", True): (8, 8, 8, 1),
    ("cuda", False): (2048, 512, 32, 3),
    ("cuda", True): (512, 128, 32, 2),
}


def run(
    device: torch.device,
    quick: bool = False,
    model: str = "vit",
    img_size: int = 224,
    train_images: int | None = None,
    val_images: int | None = None,
    batch: int | None = None,
    epochs: int | None = None,
) -> dict:
    default = SIZES[(device.type, quick)]
    train_images, val_images = train_images or default[0], val_images or default[1]
    batch, epochs = batch or default[2], epochs or default[3]
    train_images = max(batch, train_images // batch * batch)  # whole batches: the bare loop matches step for step
    torch.set_num_threads(os.cpu_count() or 1)  # a bare loop's best; the input benchmark may have set fewer
    # The default augmentation (all but the upside-down flip, which shares the flips' warp): as in most trials.
    hp = Hyperparameters(batch_size=batch, early_stop_patience=epochs + 2)
    spec = ModelSpec(model, NUM_CLASSES, img_size, pretrained=False)
    steps = train_images // batch
    out = {
        "model": model,
        "img_size": img_size,
        "train_images": train_images,
        "val_images": val_images,
        "batch": batch,
        "epochs": epochs,
        "steps_per_epoch": steps,
    }

    with tempfile.TemporaryDirectory(prefix="bench-trainable-") as tmp:
        train = write_array_split(Path(tmp) / "train.npy", train_images, img_size, NUM_CLASSES, seed=1)
        val = write_array_split(Path(tmp) / "val.npy", val_images, img_size, NUM_CLASSES, seed=2)
        if device.type == "cuda":
            select_device(1.0)  # what a trial does: cudnn autotuning on (and the memory cap)
        warmup = (1 if quick else 2) if device.type == "cpu" else 5
        out.update(measure(spec, hp, device, train, val, steps, epochs, Path(tmp), warmup))

    train_seen = steps * batch
    out["bare_img_s"] = train_seen * epochs / out["bare_s"]
    out["epoch_train_img_s"] = train_seen / out["epoch_s"]
    out["epoch_all_img_s"] = (train_seen + val_images) / out["epoch_s"]
    out["train_phase_img_s"] = train_seen / out["train_s"]
    out["ratio"] = out["epoch_all_img_s"] / out["bare_img_s"]
    out["ratio_train_only"] = out["epoch_train_img_s"] / out["bare_img_s"]
    out["ratio_train_phase"] = out["train_phase_img_s"] / out["bare_img_s"]
    return out


def new_learner(spec: ModelSpec, hp: Hyperparameters, device: torch.device) -> Learner:
    torch.manual_seed(0)
    return Learner(build_model(spec), hp, device, "val_acc", seed=0)


def measure(
    spec: ModelSpec,
    hp: Hyperparameters,
    device: torch.device,
    train,
    val,
    steps: int,
    epochs: int,
    tmp: Path,
    warmup: int,
) -> dict:
    """Bare-loop epochs and whole epochs, interleaved so that drift in machine load hits both.

    Both drive the same Learner (model, optimizer, scaler): the bare steps change its
    weights, which changes no timing, and the comparison is with the very same module.
    """
    learner = new_learner(spec, hp, device)
    bare_step = bare_loop(learner, spec, hp.batch_size)
    clock = Stopwatch()
    learner.train_epoch = clock.wrap("train", learner.train_epoch)
    learner.evaluate = clock.wrap("evaluate", learner.evaluate)

    # Warm-up (not timed): the first steps of a process are slow on both devices (kernel
    # selection, allocator growth, cudnn autotuning); evaluation's batch shape and the
    # metrics' imports too. Evaluation changes no training state.
    for _ in range(warmup):
        bare_step()
    learner.evaluate(val)
    synchronize(device)

    epochs_run = fit(learner, train, val, epochs + 1)  # one epoch more: fit must not say 'finished' early
    bare, durations, parts, checkpoint_bytes = [], [], [], 0
    for _ in range(epochs):
        learner.model.train()
        start = time.perf_counter()
        for _ in range(steps):
            bare_step()
        synchronize(device)
        bare.append(time.perf_counter() - start)

        clock.seconds.clear()
        start = time.perf_counter()
        result = next(epochs_run)
        metrics = {**result.metrics, "epoch": result.epoch, "finished": result.finished}
        with clock("checkpoint"), tempfile.TemporaryDirectory(dir=tmp) as directory:
            path = save_trial_checkpoint(directory, learner, spec, hp, metrics)
            checkpoint_bytes = path.stat().st_size
        durations.append(time.perf_counter() - start)
        parts.append(dict(clock.seconds))
    epochs_run.close()

    def mean(key: str) -> float:
        return float(np.mean([p.get(key, 0.0) for p in parts]))

    epoch_s = float(np.mean(durations))
    return {
        "bare_rounds_s": bare,
        "epoch_rounds_s": durations,
        "train_rounds_s": [p.get("train", 0.0) for p in parts],
        "bare_s": float(np.sum(bare)),
        "epoch_s": epoch_s,
        "train_s": mean("train"),
        "evaluate_s": mean("evaluate"),
        "checkpoint_s": mean("checkpoint"),
        "other_s": epoch_s - mean("train") - mean("evaluate") - mean("checkpoint"),
        "checkpoint_mb": checkpoint_bytes / 2**20,
    }


def bare_loop(learner: Learner, spec: ModelSpec, batch: int):
    """One training step of the learner's model on one fixed random batch: the ceiling a trial can reach."""
    device = learner.device
    # network: the compiled wrapper under --compile, else the model itself
    model, optimizer, scaler, loss_fn = learner.network, learner.optimizer, learner.scaler, learner.loss_fn
    size = spec.img_size
    images = torch.rand(batch, 3, size, size, device=device).contiguous(memory_format=learner.memory_format)
    labels = torch.randint(0, spec.num_classes, (batch,), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.float16, enabled=learner.amp):
            loss = loss_fn(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    return step
