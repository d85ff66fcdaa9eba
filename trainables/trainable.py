"""The Ray Tune function trainable: the only module of trainables/ that knows Ray.

A recipe: typed config -> data from the cache -> model -> restore from the last
checkpoint -> per epoch train, evaluate, report with a checkpoint.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from trainables.config import Hyperparameters
from trainables.data import CachedSplit
from trainables.engine import Learner, SpeedOptions, fit, select_device
from trainables.models import ModelSpec, build_model

CHECKPOINT_FILE = "checkpoint.pt"


@dataclass(frozen=True)
class TrialSetup:
    """What every trial of a study shares (handed over once via tune.with_parameters)."""

    model: ModelSpec
    """Architecture with the study's fixed settings; per-trial knobs come from the config."""
    train: CachedSplit
    val: CachedSplit
    epochs: int
    metric: str
    seed: int
    gpu_fraction: float
    cpus: int
    speed: SpeedOptions = SpeedOptions()


class TrialOutOfMemory(RuntimeError):
    """The trial did not fit in its share of the GPU."""


def trial_model_spec(base: ModelSpec, hp: Hyperparameters) -> ModelSpec:
    """The study's model spec with this trial's architecture knobs."""
    return replace(base, dropout=hp.dropout, drop_path_rate=hp.drop_path_rate, vit_depth=hp.vit_depth, fusion=hp.fusion)


def make_checkpoint(learner: Learner, spec: ModelSpec, hp: Hyperparameters, metrics: dict) -> dict:
    """A plain dict: training state plus what it takes to rebuild the model."""
    return {**learner.state_dict(), "model_spec": asdict(spec), "hyperparameters": hp.to_dict(), "metrics": metrics}


def load_checkpoint(path: str | Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def train_trial(config: dict, setup: TrialSetup) -> None:
    from ray import tune

    logging.getLogger("ray.train").setLevel(logging.WARNING)  # not a line per checkpoint
    hp = Hyperparameters.from_dict(config)
    torch.set_num_threads(max(setup.cpus, 1))
    torch.manual_seed(setup.seed)  # same initial head for every trial: configs compare fairly
    spec = trial_model_spec(setup.model, hp)
    device = select_device(setup.gpu_fraction, setup.speed)
    learner = Learner(build_model(spec), hp, device, setup.metric, setup.seed, setup.speed)

    restored = tune.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as directory:
            learner.load_state_dict(load_checkpoint(Path(directory) / CHECKPOINT_FILE))

    try:
        for result in fit(learner, setup.train, setup.val, setup.epochs):
            metrics = {**result.metrics, "epoch": result.epoch, "finished": result.finished}
            with tempfile.TemporaryDirectory() as directory:
                torch.save(make_checkpoint(learner, spec, hp, metrics), Path(directory) / CHECKPOINT_FILE)
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(directory))
    except torch.cuda.OutOfMemoryError:
        raise TrialOutOfMemory(
            f"CUDA out of memory at batch_size {hp.batch_size} with {setup.gpu_fraction:g} of the GPU: "
            f"drop the larger batch sizes from the space, or run fewer trials at once "
            f"(a larger --gpus-per-trial or a smaller --max-concurrent)"
        ) from None
