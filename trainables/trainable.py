"""The Ray Tune function trainable: the only module of trainables/ that knows Ray.

A recipe: typed config -> data from the cache -> model -> restore from the last
checkpoint -> per epoch train, evaluate, report with a checkpoint.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field

import ray
import torch
from ray import tune

from trainables.checkpoint import load_trial_checkpoint, save_trial_checkpoint
from trainables.config import COSTS, SEED, Hyperparameters, SpeedOptions
from trainables.costs import latency_cost, memory_cost, parameter_cost
from trainables.data import CachedSplit
from trainables.engine import Learner, Resolutions, fit, select_device
from trainables.fidelity import COMPUTE_EPOCHS, EPOCH_IMG_SIZE
from trainables.models import ModelSpec, build_model


@dataclass(frozen=True)
class TrialSetup:
    """What every trial of a study shares (handed over once via tune.with_parameters).

    The search builds it from its study configuration; the trainable needs no more.
    """

    model: ModelSpec
    """Architecture with the study's fixed settings; per-trial knobs come from the config."""
    train: CachedSplit
    val: CachedSplit
    """Train and val at the model's image size."""
    epochs: int
    metric: str
    seed: int
    gpu_fraction: float
    cpus: int
    speed: SpeedOptions = field(default_factory=SpeedOptions)
    measure_latency: bool = False
    """Time one image's inference once, after the first epoch: a study that trades accuracy against latency."""
    resolutions: Resolutions | None = None
    """Resolution as a fidelity: each epoch's image size and train and val at the smaller ones; None: every epoch
    at the model's size."""


NODE_ID = "node_id"
"""The Ray node a result was trained on, in each result: on a cluster, which machine ran the trial."""


class TrialOutOfMemory(RuntimeError):
    """The trial did not fit in its share of the GPU."""


def train_trial(config: dict, setup: TrialSetup) -> None:
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # not a line per checkpoint
    seed = config.get(SEED, setup.seed)
    hp = Hyperparameters.from_dict({name: value for name, value in config.items() if name != SEED})
    torch.set_num_threads(max(setup.cpus, 1))
    torch.manual_seed(seed)  # the search's trials start alike (same initial head): configs compare fairly
    spec = setup.model.with_knobs(hp)
    device = select_device(setup.gpu_fraction, setup.speed)
    model = build_model(spec, dynamic_size=setup.resolutions is not None)  # a ViT that takes the smaller sizes
    learner = Learner(model, hp, device, setup.metric, seed, setup.speed)

    restored = tune.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as directory:
            learner.load_state_dict(load_trial_checkpoint(directory))

    node = {NODE_ID: ray.get_runtime_context().get_node_id()}
    costs = parameter_cost(learner.model)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # Ray reuses this process from trial to trial
    try:
        for result in fit(learner, setup.train, setup.val, setup.epochs, resolutions=setup.resolutions):
            costs.update(memory_cost(device))
            if setup.measure_latency and COSTS["latency"].metric not in costs:  # once: the model's shape is fixed
                costs.update(latency_cost(learner.model, spec.img_size, device, setup.speed))
            compute = {COMPUTE_EPOCHS: result.compute_epochs, EPOCH_IMG_SIZE: result.img_size}
            metrics = {**result.metrics, **costs, **compute, "epoch": result.epoch, "finished": result.finished}
            with tempfile.TemporaryDirectory() as directory:
                save_trial_checkpoint(directory, learner, spec, hp, metrics)
                tune.report({**metrics, **node}, checkpoint=tune.Checkpoint.from_directory(directory))
    except torch.cuda.OutOfMemoryError:
        raise TrialOutOfMemory(
            f"CUDA out of memory at batch_size {hp.batch_size} with {setup.gpu_fraction:g} of the GPU: "
            f"drop the larger batch sizes from the space, or run fewer trials at once "
            f"(a larger --gpus-per-trial or a smaller --max-concurrent)"
        ) from None
