"""What a comparison found, as plain data: the report, the plots and MLflow are written from these.

Plain data (numpy arrays at most), so the report can be built and tested without torch or MLflow. Each
model's scores are search.evaluation's Intervals, drawn as the final run draws its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from search.evaluation.intervals import Interval
from search.evaluation.paired import PairedTest

LATENCY_BATCHES = (1, 32)
"""Inference batch sizes a model's latency is measured at, in the order the tables show them."""


@dataclass(frozen=True)
class Costs:
    """What a model costs to train and to run, measured on one device."""

    parameters: int
    device: str
    """'cuda' or 'cpu': where the times were measured (the study's device)."""
    train_images_per_s: float
    """Training throughput at the winner's batch size (augmentation, forward, backward, step)."""
    latency_ms: dict[int, float]
    """Inference batch size -> median milliseconds per batch (batch 1 and batch 32)."""
    peak_train_memory: int | None = None
    """Peak CUDA bytes while training (None on the CPU)."""


@dataclass(frozen=True)
class SearchCost:
    """What the hyperparameter search cost (None for the reference, which is not searched)."""

    wall_seconds: float
    gpu_hours: float
    """Each trial's time multiplied by its GPU share, summed."""
    trials: int
    compute_epochs: float = float("nan")
    """Every trial's compute summed, in full-resolution epochs (the study run's compute_epochs; NaN for a study
    that predates it)."""
    compute_vs_recipe: float = float("nan")
    """compute_epochs over one full training of the recipe (the study's --epochs)."""


@dataclass(frozen=True)
class ModelResult:
    """One compared model: its test scores with intervals, its costs and where it came from."""

    name: str
    """cnn, vit, hybrid, or the reference's timm name."""
    metrics: dict[str, Interval]
    """COMPARED_METRICS -> value with interval."""
    costs: Costs
    confusion: np.ndarray
    """(C, C) counts: rows true classes, columns predictions."""
    final_run_id: str
    study: str | None = None
    search: SearchCost | None = None
    config: dict = field(default_factory=dict)
    """The winning knobs (those that apply to the model); the reference's defaults."""
    reference: bool = False
    retrain_vs_recipe: float = float("nan")
    """The retrain's compute in recipe trainings: the epochs it trained (an ensemble: every member's, summed; an
    early-stopped network's as far as it ran) over the study's --epochs; NaN where not read."""
    ensemble: Ensemble | None = None
    """What makes it an ensemble (compare.py --ensemble K); None for a single model."""


def ensemble_label(single: str, k: int) -> str:
    """How the report names the ensemble of K configurations of `single`'s study: 'vit-ensemble3'."""
    return f"{single}-ensemble{k}"


@dataclass(frozen=True)
class Ensemble:
    """A compared model that averages the calibrated probabilities of K retrained configurations of one study."""

    of: str
    """The single model whose study gave the members (vit): the ensemble is set beside it."""
    members: tuple[str, ...]
    """The members' trial labels, best first (the first is the single model's configuration)."""
    forward_passes: int
    """Networks run per image (members x views)."""


@dataclass(frozen=True)
class Comparison:
    """Everything the report says."""

    name: str
    classes: list[str]
    test_images: int
    models: list[ModelResult]
    """The lightweight models first, then the reference if any."""
    pairs: list[PairedTest]
    """Every pair of lightweight models, then the reference against each."""
    recommendation: str
    """One sentence: which model to pick and why."""
    resamples: int
    settings: dict = field(default_factory=dict)
    """The shared study settings (data, seed, img_size, epochs, trials, ...), for the report's header."""
