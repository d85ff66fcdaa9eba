"""--gpus-per-trial auto: measure what one trial needs on the GPU, then share the GPU by it.

Ray's fractional GPU is bookkeeping only, and each trial caps its own CUDA allocator to
its share less the CUDA context (engine.select_device, trainables.gpu_memory). So the
share must cover the largest configuration the search can draw, and the number of
trials at once must fit in the memory that is actually free:

    per trial = peak reserved * (1 + margin) + CUDA context
    fraction  = per trial / total memory     (Ray's share; the allocator's cap is this less the context)
    trials    = how many per-trial budgets fit in the free memory (at least one)

The peak is what PyTorch's caching allocator *reserved*, not what tensors allocated: the
allocator holds freed blocks for reuse, and for a cnn trial at batch 32 (on an H200) it
reserved about 23 % more than `max_memory_allocated`. Sized from the allocated peak, two
such trials fitted an 8 GB card's 7.6 GiB free on paper and needed about 7.9 GiB.

`probe_peak_memory` measures the peak by running the trial's own training step;
`choose_gpu_fraction` is the arithmetic, free of CUDA so it can be tested anywhere.
`HPO_GPU_MEMORY_GIB=8` rehearses a smaller card on a larger one: `auto` plans for 8 GiB.
"""

from __future__ import annotations

import gc
import math
import multiprocessing
import os
import signal
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trainables.config import AUGMENTS, KNOBS, SHAPES_MODEL
from trainables.gpu_memory import CUDA_CONTEXT_BYTES, GiB

DEFAULT_MARGIN = 0.15
"""Headroom over the measured peak reservation for what a probe of two steps may not have met: kernels and
cuDNN workspaces of later batches, and the allocator's fragmentation over a long run."""
CARD_ENV = "HPO_GPU_MEMORY_GIB"
"""Set to a size in GiB, `auto` plans as if the GPU had that much memory (less what is in use on it now): a
rehearsal of the 8 GB reference card on a larger GPU. The trials' caps then keep the study within it."""
FRACTION_STEP = 1e-4
"""Ray rounds fractional resources to four decimals: round the fraction up to that."""


class NoCudaError(RuntimeError):
    """Probing GPU memory was asked for where no CUDA GPU is visible."""


class GpuTooSmall(ValueError):
    """Not even one trial fits in the GPU's free memory; the message says what to change."""


@dataclass(frozen=True)
class GpuPlan:
    """How a study shares one GPU."""

    fraction: float
    """Share of the GPU's total memory per trial: Ray's gpus-per-trial, and the cap each
    trial sets (less the CUDA context) with torch.cuda.set_per_process_memory_fraction. In (0, 1]."""
    trials: int
    """Trials that fit side by side in the free memory (a max-concurrent); at least 1."""
    per_trial_bytes: int
    """One trial's budget: measured peak reservation plus margin plus the CUDA context."""
    explanation: str
    """One line, for the study's log: the numbers behind the choice."""


def gib(value: float) -> str:
    return f"{value / GiB:.2f} GiB"


def choose_gpu_fraction(
    peak_bytes: int,
    free_bytes: int,
    total_bytes: int,
    margin: float = DEFAULT_MARGIN,
    overhead_bytes: int = CUDA_CONTEXT_BYTES,
) -> GpuPlan:
    """The GPU share per trial and how many trials run at once; GpuTooSmall if none fits.

    peak_bytes: one trial's peak reservation by PyTorch's allocator (probe_peak_memory) at the largest batch size.
    free_bytes, total_bytes: the GPU's memory now (torch.cuda.mem_get_info(); planned_free for a rehearsal).
    """
    problems = []
    if total_bytes <= 0:
        problems.append(f"total memory must be positive, got {total_bytes}")
    if not 0 <= free_bytes <= total_bytes:
        problems.append(f"free memory must lie in [0, total={total_bytes}], got {free_bytes}")
    if peak_bytes <= 0:
        problems.append(f"peak memory must be positive, got {peak_bytes}")
    if margin < 0:
        problems.append(f"margin must be >= 0, got {margin}")
    if overhead_bytes < 0:
        problems.append(f"overhead must be >= 0, got {overhead_bytes}")
    if problems:
        raise ValueError("choose_gpu_fraction: " + "; ".join(problems))

    per_trial = math.ceil(peak_bytes * (1 + margin)) + overhead_bytes
    budget = f"peak {gib(peak_bytes)} reserved + {margin:.0%} margin + {gib(overhead_bytes)} CUDA context"
    if per_trial > free_bytes:
        where = "the GPU's" if per_trial > total_bytes else "the free"
        raise GpuTooSmall(
            f"one trial needs {gib(per_trial)} ({budget}) but {where} memory is {gib(free_bytes)} free "
            f"of {gib(total_bytes)}: lower the largest batch_size in the search space or --img-size"
            + ("" if per_trial > total_bytes else ", or close what else uses the GPU")
        )
    # Round up (never under the budget) in Ray's steps; 1e-9 absorbs float noise in exact ratios.
    fraction = min(1.0, math.ceil(per_trial / total_bytes / FRACTION_STEP - 1e-9) * FRACTION_STEP)
    fraction = round(fraction, 4)
    by_memory = free_bytes // per_trial
    by_ray = math.floor(1 / fraction + 1e-9)  # Ray places floor(1 / fraction) trials on one GPU
    trials = max(1, min(by_memory, by_ray))
    explanation = (
        f"one trial needs {gib(per_trial)} ({budget}) = {fraction:.4g} of {gib(total_bytes)}; "
        f"{trials} trial{'s' if trials > 1 else ''} at once in {gib(free_bytes)} free"
    )
    return GpuPlan(fraction, int(trials), int(per_trial), explanation)


def rehearsed_card() -> int | None:
    """The card HPO_GPU_MEMORY_GIB asks `auto` to plan for, in bytes; None where it is not set."""
    value = os.environ.get(CARD_ENV, "").strip()
    if not value:
        return None
    try:
        size = float(value)
    except ValueError:
        size = math.nan
    if not size > 0:  # NaN fails too
        raise ValueError(f"{CARD_ENV}={value!r}: give the rehearsed card's memory in GiB, e.g. {CARD_ENV}=8")
    return int(size * GiB)


def planned_free(free_bytes: int, total_bytes: int, card_bytes: int | None) -> int:
    """The free memory `auto` plans with: the GPU's own; on a rehearsed card of card_bytes (rehearsed_card), that
    card less what is in use on the GPU now, so that the trials placed together stay within it."""
    if card_bytes is None:
        return free_bytes
    return max(0, min(free_bytes, card_bytes - (total_bytes - free_bytes)))


def probe_peak_memory(
    model_name: str, num_classes: int, batch_size: int, img_size: int, speed=None, **model_knobs
) -> int:
    """Peak CUDA bytes one trial allocates: its own training steps and evaluation batch.

    Runs the engine's Learner with the study's speed options (default: fp16 autocast +
    GradScaler, channels_last, cuDNN autotuning; --no-amp roughly doubles the peak),
    AdamW and the batched augmentation, for two training steps -- the second with
    AdamW's state allocated, which is a trial's steady state -- and one evaluation batch
    of twice the batch size, as `predict` uses. Returns max_memory_reserved over that
    (what the caching allocator held, freed blocks kept for reuse included: what the
    process takes from the GPU), less what this process held before. Pass the largest configuration the space can
    draw (Space.heaviest: the largest batch size and ViT depth). Weights are random:
    memory does not depend on their values.

    Run it in a process that will not host trials (see probe_in_subprocess): the probe
    leaves a CUDA context behind.
    """
    # torch and the modules built on it load here, not at the top: the arithmetic above is
    # used (and tested) without them, and the probe runs in a process of its own.
    import torch

    if not torch.cuda.is_available():
        raise NoCudaError(
            "--gpus-per-trial auto measures GPU memory, but no CUDA GPU is visible: "
            "pass --gpus-per-trial 0 to train on the CPU"
        )
    from trainables.config import Hyperparameters, SpeedOptions
    from trainables.data import CachedSplit
    from trainables.engine import EVAL_BATCH_FACTOR, Learner
    from trainables.models import ModelSpec, build_model

    known = set(SHAPES_MODEL)
    unknown = sorted(set(model_knobs) - known)
    if unknown:
        raise ValueError(f"unknown model knob(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
    spec = ModelSpec(model_name, num_classes, img_size, pretrained=False, **model_knobs)
    # Every augmentation on: each allocates its own temporaries, whatever its value, and a space may turn any on.
    hp = Hyperparameters.from_dict({"batch_size": batch_size, **{name: KNOBS[name].high for name in AUGMENTS}})
    speed = speed or SpeedOptions()
    device = torch.device("cuda")

    autotune = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = speed.cudnn_benchmark  # as select_device sets it in a trial: its workspaces count
    learner = None
    with tempfile.TemporaryDirectory(prefix="probe-") as tmp:
        path = Path(tmp) / "images.npy"
        count = EVAL_BATCH_FACTOR * batch_size  # two training steps, one evaluation batch
        images = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(count, img_size, img_size, 3))
        images[:] = np.random.default_rng(0).integers(0, 256, images.shape, dtype=np.uint8)
        images.flush()
        del images
        split = CachedSplit(str(path), np.arange(count, dtype=np.int64) % num_classes)
        try:
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.synchronize()
            before = torch.cuda.memory_reserved(device)
            torch.cuda.reset_peak_memory_stats(device)
            learner = Learner(build_model(spec), hp, device, speed=speed)
            learner.train_epoch(split)
            learner.predict(split)
            torch.cuda.synchronize()
            return int(torch.cuda.max_memory_reserved(device) - before)
        except torch.cuda.OutOfMemoryError:
            free, total = torch.cuda.mem_get_info()
            raise GpuTooSmall(
                f"one {model_name} trial at batch_size {batch_size} and {img_size} px does not fit in the GPU "
                f"({gib(free)} free of {gib(total)}): lower the largest batch_size in the search space or --img-size"
            ) from None
        finally:
            del learner
            gc.collect()
            torch.cuda.empty_cache()
            torch.backends.cudnn.benchmark = autotune


class GpuProbe:
    """probe_peak_memory in a fresh spawned process: started now, read with result().

    The search's driver process then never creates a CUDA context of its own, which
    would hold ~0.5 GiB of the GPU for the whole study; and the probe (tens of seconds:
    CUDA start-up, cuDNN autotuning) overlaps the driver's data caching and Ray's start.
    `free` is read in the child with its allocator emptied, so it undercounts by the
    child's own context: on the safe side.
    """

    def __init__(self, model_name: str, num_classes: int, batch_size: int, img_size: int, speed=None, **model_knobs):
        context = multiprocessing.get_context("spawn")  # CUDA cannot live in a forked child
        self._receive, send = context.Pipe(duplex=False)
        self._process = context.Process(
            target=_probe_and_send,
            args=(send, model_name, num_classes, batch_size, img_size, speed, model_knobs),
            name="gpu-probe",
            daemon=True,  # ends with the driver, on Ctrl-C too
        )
        self._process.start()
        send.close()  # the child holds the only writing end: its death reads as EOF here

    def result(self) -> tuple[int, int, int]:
        """(peak, free, total) bytes; re-raises the probe's GpuTooSmall or NoCudaError."""
        try:
            outcome, value = self._receive.recv()
        except EOFError:
            self._process.join()
            raise RuntimeError(f"the GPU memory probe died (exit code {self._process.exitcode})") from None
        self._process.join()
        if outcome == "error":
            raise value
        return value

    def cancel(self) -> None:
        """Stop the probe: the study will not run, so its measurement is not needed."""
        if self._process.is_alive():
            self._process.terminate()  # exits cleanly at its next Python instruction
            self._process.join(timeout=10)
        if self._process.is_alive():  # stuck inside a CUDA call
            self._process.kill()
        self._process.join()


def _probe_and_send(
    send, model_name: str, num_classes: int, batch_size: int, img_size: int, speed, model_knobs: dict
) -> None:
    # Ctrl-C is the driver's to handle (it cancels the probe); cancel() sends SIGTERM,
    # which exits through Python so that the probe's temporary images are removed.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        send.send(("ok", measure_gpu(model_name, num_classes, batch_size, img_size, speed, model_knobs)))
    except (GpuTooSmall, NoCudaError, ValueError) as error:  # the expected ones, by their own type
        send.send(("error", error))
    except Exception as error:  # anything else as a plain error: its class may not unpickle in the parent
        send.send(("error", RuntimeError(f"GPU memory probe: {type(error).__name__}: {error}")))


def measure_gpu(
    model_name: str, num_classes: int, batch_size: int, img_size: int, speed, model_knobs: dict
) -> tuple[int, int, int]:
    """(peak, free, total) bytes: one trial's peak, then the GPU's free and total memory, in this process."""
    import torch

    peak = probe_peak_memory(model_name, num_classes, batch_size, img_size, speed, **model_knobs)
    free, total = torch.cuda.mem_get_info()
    return peak, int(free), int(total)


def probe_in_subprocess(
    model_name: str, num_classes: int, batch_size: int, img_size: int, speed=None, **model_knobs
) -> tuple[int, int, int]:
    """(peak, free, total) bytes, measured in a fresh spawned process (see GpuProbe)."""
    return GpuProbe(model_name, num_classes, batch_size, img_size, speed, **model_knobs).result()
