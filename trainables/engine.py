"""The one training engine: every trial and the final retrain run through `fit`.

A Learner owns model, optimizer, scheduler and scaler on one device; `fit` runs it
epoch by epoch (train, evaluate, schedule, early-stop) and yields each epoch's
metrics, leaving reporting and checkpointing to the caller (Ray Tune in a trial,
MLflow in the final retrain).
"""

from __future__ import annotations

import math
import queue
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from sklearn.metrics import balanced_accuracy_score, f1_score
from torch import nn

from trainables.augment import augment_batch
from trainables.config import CLASS_WEIGHTINGS, METRIC_MODES, Hyperparameters, SpeedOptions, improves
from trainables.data import CachedSplit
from trainables.fidelity import epoch_compute
from trainables.gpu_memory import allocator_fraction

EVAL_BATCH_FACTOR = 2
"""Evaluation batches are this many times the training batch: no gradients, so they fit."""
EFFECTIVE_NUMBER_BETA = 0.999
"""β of class_weighting='effective': a class of n images counts as (1 - β^n) / (1 - β) (Cui et al., CVPR 2019).
The paper picks β per dataset from {0.9, 0.99, 0.999, 0.9999}; its N = 1 / (1 - β) is the number of distinct
prototypes of a class, not the size of the dataset, so a β derived from the dataset's size would misread it.
0.999 makes the effective number level off near 1000 images: on the few thousand images this tool is made for,
'effective' lies between 'none' and 'inverse' (classes of 100 and 2000 images weigh 9:1 against inverse's 20:1),
a choice of its own for the search rather than a near copy of 'inverse'."""


class NonFiniteLoss(FloatingPointError):
    """The training loss became NaN or infinite: this configuration diverged."""


@dataclass(frozen=True)
class EpochResult:
    epoch: int
    """1-based number of the epoch just finished."""
    metrics: dict[str, float]
    improved: bool
    """The monitored metric is the best so far (the checkpoint worth keeping)."""
    finished: bool
    """No epoch follows: the budget is spent or early stopping triggered."""
    img_size: int = 0
    """The image size the epoch trained and validated at."""
    compute_epochs: float = 0.0
    """The run's compute so far, this epoch included, in full-resolution epochs (trainables.fidelity)."""


@dataclass(frozen=True)
class Resolutions:
    """Resolution as a fidelity: the image size of each epoch, and the splits decoded at the smaller ones."""

    sizes: tuple[int, ...]
    """The size of epochs 1, 2, ... (trainables.fidelity.resolution_schedule); the full size beyond."""
    splits: Mapping[int, tuple[CachedSplit, CachedSplit | None]]
    """(train, val) at each size of `sizes` below the full one."""


def select_device(gpu_fraction: float = 1.0, speed: SpeedOptions = SpeedOptions()) -> torch.device:
    """CUDA when visible and granted (capped to our share of it), else the CPU."""
    if gpu_fraction > 0 and torch.cuda.is_available():
        # Ray's fractional GPU is bookkeeping only: enforce the share ourselves. The share budgets the whole
        # process, and the CUDA context lives outside the allocator's cap: the allocator gets the share less it.
        total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        torch.cuda.set_per_process_memory_fraction(allocator_fraction(gpu_fraction, total))
        torch.backends.cudnn.benchmark = speed.cudnn_benchmark
        return torch.device("cuda")
    return torch.device("cpu")


class Learner:
    """Model, optimizer, scheduler and scaler on one device, with early-stopping state."""

    def __init__(
        self,
        model: nn.Module,
        hp: Hyperparameters,
        device: torch.device,
        monitor: str = "val_acc",
        seed: int = 0,
        speed: SpeedOptions = SpeedOptions(),
    ):
        self.device, self.hp, self.monitor, self.seed = device, hp, monitor, seed
        self.mode: Literal["min", "max"] = "max" if METRIC_MODES.get(monitor) == "max" else "min"
        cuda = device.type == "cuda"
        self.amp = cuda and speed.amp
        self.finite_check_every = 16 if self.amp else 1  # without GradScaler, stop at the first bad step
        self.memory_format = torch.channels_last if cuda and speed.channels_last else torch.contiguous_format
        self.model = model.to(device).to(memory_format=self.memory_format)
        # The compiled wrapper runs the steps; self.model keeps plain state-dict keys.
        self.network = torch.compile(self.model) if cuda and speed.compile else self.model
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.optimizer, mode=self.mode, factor=hp.plateau_factor, patience=hp.plateau_patience
        )
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp)
        self.loss_fn = nn.CrossEntropyLoss(label_smoothing=hp.label_smoothing)
        """The training loss; its class weights (hp.class_weighting) are those of the split each epoch trains on."""
        self.epoch = 0
        self.best_score: float | None = None
        self.bad_epochs = 0
        self.compute_epochs = 0.0
        """Full-resolution epochs trained so far (EpochResult.compute_epochs)."""

    # ------------------------------------------------------------ one epoch

    def train_epoch(self, split: CachedSplit, on_batch: Callable[[], None] | None = None) -> float:
        """One pass over split with augmentation; returns the mean training loss.

        on_batch, if given, is called after every batch (a progress bar's tick).
        """
        self.model.train()
        # Every source of randomness (order, augmentation, dropout) is seeded per epoch,
        # so a run resumed from a checkpoint replays exactly the epochs it missed.
        epoch_seed = self.seed * 100_003 + self.epoch
        order = np.random.default_rng(epoch_seed).permutation(len(split))
        generator = torch.Generator(device=self.device).manual_seed(epoch_seed)
        torch.manual_seed(epoch_seed)
        total, seen = torch.zeros((), device=self.device), 0
        batches = self.batches(split, order, self.hp.batch_size, drop_single=True)
        for step, (images, labels) in enumerate(batches, start=1):
            images = augment_batch(images, generator, **self.hp.augmentation())
            with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
                logits = self.network(images)
                if step == 1:  # the classes are the logits' columns: a split given as folders may lack one
                    self.loss_fn.weight = self.class_weight(split.labels, logits.shape[1])
                loss = self.loss_fn(logits, labels)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            # A NaN or infinite loss makes the running total non-finite too. Reading it
            # waits for the GPU, so on CUDA look every few steps; GradScaler skips the
            # steps in between whose gradients are not finite, so no weight is spoiled.
            total += loss.detach() * len(labels)
            seen += len(labels)
            if step % self.finite_check_every == 0 and not torch.isfinite(total):
                raise self.diverged(total)
            if on_batch is not None:
                on_batch()
        if not torch.isfinite(total):
            raise self.diverged(total)
        return total.item() / max(seen, 1)

    def class_weight(self, labels: np.ndarray, classes: int) -> torch.Tensor | None:
        """The loss's weight per class for a training split of these labels (None: every image alike)."""
        weights = class_weights(np.bincount(labels, minlength=classes).tolist(), self.hp.class_weighting)
        return None if weights is None else torch.tensor(weights, dtype=torch.float32, device=self.device)

    def diverged(self, total: torch.Tensor) -> NonFiniteLoss:
        return NonFiniteLoss(
            f"training loss became {total.item():g} in epoch {self.epoch + 1}: "
            f"lower the learning rate (lr={self.hp.lr:g})"
        )

    @torch.no_grad()
    def predict(
        self, split: CachedSplit, on_batch: Callable[[], None] | None = None
    ) -> tuple[torch.Tensor, np.ndarray]:
        """Float32 logits (N, C) on the CPU, in split order, and the labels; on_batch as in train_epoch."""
        self.model.eval()
        outputs = []
        for images, _ in self.batches(split, np.arange(len(split)), EVAL_BATCH_FACTOR * self.hp.batch_size):
            with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
                outputs.append(self.network(images).float().cpu())
            if on_batch is not None:
                on_batch()
        return torch.cat(outputs), split.labels

    def evaluate(
        self, split: CachedSplit, prefix: str = "val", on_batch: Callable[[], None] | None = None
    ) -> dict[str, float]:
        logits, labels = self.predict(split, on_batch)
        # Unweighted whatever class_weighting trains with: trials that weigh classes differently compare on one loss.
        loss = nn.functional.cross_entropy(logits, torch.tensor(labels)).item()
        return {f"{prefix}_loss": loss, **classification_metrics(labels, logits.argmax(1).numpy(), prefix)}

    def end_epoch(self, metrics: dict[str, float]) -> bool:
        """Step the scheduler and early-stopping state; True if the monitored metric improved."""
        score = metrics[self.monitor]
        self.scheduler.step(score)
        self.epoch += 1
        better = improves(self.mode, score, self.best_score)  # a NaN epoch never is: the next real score is the best
        if better:
            self.best_score, self.bad_epochs = score, 0
        else:
            self.bad_epochs += 1
        return better

    # ------------------------------------------------------------ batches

    def batches(
        self, split: CachedSplit, order: np.ndarray, batch_size: int, drop_single: bool = False
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(images float [0, 1] NCHW on device, labels) in the given order.

        The gather from the memory-mapped cache runs one batch ahead in a thread,
        so the device does not wait for the disk.
        """
        images, labels = split.images(), split.labels
        starts = range(0, batch_count(len(order), batch_size, drop_single) * batch_size, batch_size)

        def gather(start: int) -> tuple[torch.Tensor, torch.Tensor]:
            # Reading sorted rows from the memory map is sequential on disk; the order
            # within a batch does not matter.
            rows = np.sort(order[start : start + batch_size])
            batch = torch.from_numpy(np.ascontiguousarray(images[rows]))
            if self.device.type == "cuda":
                batch = batch.pin_memory()
            return batch, torch.from_numpy(labels[rows])

        for batch, batch_labels in prefetch(gather(s) for s in starts):
            batch = batch.to(self.device, non_blocking=True)
            # NHWC uint8 -> NCHW float: the permuted view is channels_last in memory already.
            floats = batch.permute(0, 3, 1, 2).float().div_(255).contiguous(memory_format=self.memory_format)
            yield floats, batch_labels.to(self.device, non_blocking=True)

    # ------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "best_score": self.best_score,
            "bad_epochs": self.bad_epochs,
            "compute_epochs": self.compute_epochs,
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.best_score, self.bad_epochs = state["epoch"], state["best_score"], state["bad_epochs"]
        # A checkpoint from before compute was counted trained every epoch at the full size.
        self.compute_epochs = state.get("compute_epochs", float(self.epoch))


def fit(
    learner: Learner,
    train: CachedSplit,
    val: CachedSplit | None,
    epochs: int,
    on_batch: Callable[[], None] | None = None,
    resolutions: Resolutions | None = None,
) -> Iterator[EpochResult]:
    """Train until `epochs` epochs are done or early stopping triggers; yield every epoch.

    Without a validation split (final retrain on train+val) the training loss is
    monitored and the full budget is spent. on_batch, if given, is called after every
    training and validation batch (a progress bar's tick; `epoch_batches` counts them).
    With `resolutions`, each epoch trains and validates at its size of the schedule (train and val are the
    full size's); a learner restored from a checkpoint goes on with the schedule at its next epoch. Early
    stopping ends a run at a full-size epoch only, so that its last score is one at the full size.
    """
    full_size = image_size(train)
    while learner.epoch < epochs:
        size = epoch_size(resolutions, learner.epoch + 1, full_size)
        if resolutions is None or size == full_size:
            epoch_train, epoch_val = train, val
        else:
            epoch_train, epoch_val = resolutions.splits[size]
        metrics = {"train_loss": learner.train_epoch(epoch_train, on_batch)}
        trained = trained_images(len(epoch_train), learner.hp.batch_size)
        learner.compute_epochs += epoch_compute(trained, len(epoch_train), size, full_size)
        if epoch_val is not None:
            metrics.update(learner.evaluate(epoch_val, on_batch=on_batch))
        metrics["lr"] = learner.optimizer.param_groups[0]["lr"]
        improved = learner.end_epoch(metrics)
        early_stop = val is not None and learner.bad_epochs >= learner.hp.early_stop_patience and size == full_size
        finished = learner.epoch >= epochs or early_stop
        yield EpochResult(learner.epoch, metrics, improved, finished, size, learner.compute_epochs)
        if finished:
            return


def class_weights(counts: Sequence[int], weighting: str) -> list[float] | None:
    """The cross-entropy's weight of each class, from the training split's count of each (None for 'none').

    inverse: N / (C n_c), so that each class's images weigh N / C together, as in a balanced split.
    effective: 1 / E(n_c), E(n) = (1 - β^n) / (1 - β) (EFFECTIVE_NUMBER_BETA), scaled to average 1 over the classes
    as Cui et al. do. A class without training images counts as one: it is never a target, so its weight only has
    to be finite.
    """
    if weighting == "none":
        return None
    counts = [max(int(count), 1) for count in counts]
    if weighting == "inverse":
        total = sum(counts)
        return [total / (len(counts) * count) for count in counts]
    if weighting == "effective":
        # 1 - β^n, computed as -expm1(n log β): exact where β^n is close to 1
        effective = [
            -math.expm1(count * math.log(EFFECTIVE_NUMBER_BETA)) / (1 - EFFECTIVE_NUMBER_BETA) for count in counts
        ]
        raw = [1 / number for number in effective]
        return [weight * len(raw) / sum(raw) for weight in raw]
    raise ValueError(f"class_weighting {weighting!r} is not one of {', '.join(CLASS_WEIGHTINGS)}")


def epoch_size(resolutions: Resolutions | None, epoch: int, full_size: int) -> int:
    """The image size of 1-based `epoch`: the schedule's, or the full size (no schedule, or past its end)."""
    if resolutions is None or epoch > len(resolutions.sizes):
        return full_size
    return resolutions.sizes[epoch - 1]


def image_size(split: CachedSplit) -> int:
    """The side of a cached split's square images (its array is N x size x size x 3)."""
    return int(split.images().shape[1])


def trained_images(images: int, batch_size: int) -> int:
    """Images one training epoch trains on: all, but a trailing batch of one (batch_count's drop_single)."""
    dropped = batch_count(images, batch_size) - batch_count(images, batch_size, drop_single=True)
    return images - dropped


def batch_count(images: int, batch_size: int, drop_single: bool = False) -> int:
    """Batches in one pass over `images` (with drop_single, a trailing batch of one is left out:
    BatchNorm cannot train on a batch of one)."""
    count = -(-images // batch_size)
    return count - 1 if drop_single and images % batch_size == 1 and images > 1 else count


def epoch_batches(train: int, val: int | None, batch_size: int) -> int:
    """Batches `fit` runs per epoch (and calls on_batch for): training, then validation at twice the batch."""
    return batch_count(train, batch_size, drop_single=True) + (
        batch_count(val, EVAL_BATCH_FACTOR * batch_size) if val else 0
    )


def classification_metrics(labels: np.ndarray, predictions: np.ndarray, prefix: str = "val") -> dict[str, float]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # classes absent from a tiny split are expected
        return {
            f"{prefix}_acc": float((labels == predictions).mean()),
            f"{prefix}_balanced_acc": float(balanced_accuracy_score(labels, predictions)),
            f"{prefix}_macro_f1": float(f1_score(labels, predictions, average="macro", zero_division=0)),
        }


def prefetch(items: Iterator, depth: int = 2) -> Iterator:
    """Iterate items produced by a background thread, up to `depth` ahead."""
    buffer: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                buffer.put(item)
            buffer.put(done)
        except BaseException as error:  # hand the failure to the consumer
            buffer.put(error)

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        while (item := buffer.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full buffer
            try:
                buffer.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.01)
