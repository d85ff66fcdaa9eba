"""What a comparison found, as plain data: the report, the plots and MLflow are written from these.

Plain data (numpy arrays at most), so the report can be built and tested without torch or MLflow. Each
model's scores are search.evaluation's Intervals, drawn as the final run draws its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from search.evaluation.intervals import Interval

SIGNIFICANCE = 0.05
"""A paired difference with McNemar's p below this is called significant."""
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


@dataclass(frozen=True)
class PairedTest:
    """Two models on the same test images: a - b in accuracy, and whether that is more than chance."""

    a: str
    b: str
    difference: Interval
    """Accuracy of a minus accuracy of b (fractions), with its paired bootstrap interval."""
    p_value: float
    """McNemar's exact test on the images exactly one of the two gets right."""
    a_only: int
    """Images a gets right and b wrong."""
    b_only: int

    @property
    def significant(self) -> bool:
        return self.p_value < SIGNIFICANCE


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
