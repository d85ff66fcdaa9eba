"""CUDA only: what each speed flag buys, per model, on the bare training step.

For cnn, vit and hybrid at 224 px, batch 32, one Learner per variant of SpeedOptions:

    fp32                 --no-amp --no-channels-last
    amp                  --no-channels-last
    amp + channels_last  the default
    + torch.compile      --compile (its first steps are the compile time every trial pays)

and times the Learner's own step (autocast, GradScaler, AdamW) on a fixed random batch
already on the GPU, so the numbers are the model's ceiling, free of the input path.
"""

from __future__ import annotations

import gc
import time

import torch
from common import synchronize
from trainable_efficiency import bare_loop

from trainables.config import Hyperparameters, SpeedOptions
from trainables.engine import Learner, select_device
from trainables.models import ModelSpec, build_model

MODELS = ("cnn", "vit", "hybrid")
IMG_SIZE = 224
BATCH = 32
NUM_CLASSES = 11
VARIANTS = {
    "fp32": SpeedOptions(amp=False, channels_last=False),
    "amp": SpeedOptions(channels_last=False),
    "amp_channels_last": SpeedOptions(),
    "compile": SpeedOptions(compile=True),
}
COMPILE_STEPS = 3
"""Steps timed as the compile cost: the first traces forward and backward; the next ones
catch recompiles (GradScaler's first update, the optimizer's state appearing)."""


def run(
    device: torch.device,
    quick: bool = False,
    models: tuple[str, ...] = MODELS,
    compile_models: tuple[str, ...] | None = None,
) -> dict:
    """compile_models: the models whose compile time is measured (default: cnn and vit --
    the hybrid's compile costs about both of theirs together, minutes of a short lease)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return {"skipped": "no CUDA"}
    compile_models = ("vit",) if quick else (compile_models or ("cnn", "vit"))
    steps = 10 if quick else 30
    out: dict = {"gpu": torch.cuda.get_device_name(0), "batch": BATCH, "img_size": IMG_SIZE, "steps": steps}
    for model in models:
        for variant, speed in VARIANTS.items():
            if variant == "compile" and model not in compile_models:
                continue
            try:
                out[f"{model}.{variant}"] = measure(model, speed, steps)
            except Exception as error:  # one variant failing (compile, say) should not hide the rest
                out[f"{model}.{variant}"] = {"error": f"{type(error).__name__}: {error}".splitlines()[0][:200]}
            finally:
                if variant == "compile":
                    torch._dynamo.reset()  # the next model compiles from scratch, and this one's graphs are freed
                gc.collect()
                torch.cuda.empty_cache()
    return out


def measure(model: str, speed: SpeedOptions, steps: int) -> dict:
    device = select_device(1.0, speed)
    spec = ModelSpec(model, NUM_CLASSES, IMG_SIZE, pretrained=False)
    torch.manual_seed(0)
    learner = Learner(build_model(spec), Hyperparameters(batch_size=BATCH), device, speed=speed)
    step = bare_loop(learner, spec, BATCH)
    torch.cuda.reset_peak_memory_stats()

    synchronize(device)
    start = time.perf_counter()
    for _ in range(COMPILE_STEPS):  # warm-up: autotuning, allocator growth, compilation
        step()
    synchronize(device)
    first_steps = time.perf_counter() - start

    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    seconds = time.perf_counter() - start
    per_step = seconds / steps
    return {
        "img_s": BATCH * steps / seconds,
        "step_ms": 1000 * per_step,
        "warmup_extra_s": first_steps - COMPILE_STEPS * per_step,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
    }
