"""Checkpoints and model files: the one module that writes and reads them.

Both are plain dicts saved with torch.save and loaded with weights_only=True (no
pickled code runs). A trial checkpoint holds the training state (model, optimizer,
scheduler, scaler, epoch, early-stopping state) to resume a trial; a model file holds
the weights and what it takes to rebuild and use the model (spec, hyperparameters,
classes, metrics): the study's best_model.pt and the final retrain's model.pt.
Neither holds a path of the machine that wrote it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from trainables.config import Hyperparameters
from trainables.spec import ModelSpec

if TYPE_CHECKING:  # the engine loads scikit-learn: predict.py reads model files without it
    from trainables.engine import Learner

CHECKPOINT_FILE = "checkpoint.pt"
"""A trial checkpoint's file inside the folder Ray Tune keeps per checkpoint."""


def save_trial_checkpoint(
    directory: str | Path, learner: Learner, spec: ModelSpec, hp: Hyperparameters, metrics: dict
) -> Path:
    """The learner's training state plus the spec, hyperparameters and this epoch's metrics."""
    path = Path(directory) / CHECKPOINT_FILE
    state = {**learner.state_dict(), "model_spec": spec.portable(), "hyperparameters": hp.to_dict(), "metrics": metrics}
    torch.save(state, path)
    return path


def load_trial_checkpoint(directory: str | Path) -> dict:
    """A trial checkpoint as saved: learner.load_state_dict takes it as it is."""
    return torch.load(Path(directory) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)


@dataclass(frozen=True)
class ModelFile:
    """A trained model with what it takes to rebuild and use it."""

    weights: dict
    """The model's state dict."""
    spec: ModelSpec
    hyperparameters: Hyperparameters
    classes: list[str]
    """Class names in output order."""
    metrics: dict
    temperature: float = 1.0
    """Divides the logits before the softmax: fitted on the validation split by final.py (temperature
    scaling), so that the probabilities mean what they say; 1.0 for an uncalibrated model."""
    operating_point: dict | None = None
    """final.py --operating-point's threshold: {positive (a class name), threshold (on that class's calibrated
    probability: flagged at or above it), target ('sensitivity' or 'specificity'), target_value}; None: none."""
    window: tuple[float, float] | None = None
    """The (center, width) its DICOM training images were windowed with (run.py --window), which predict.py
    applies too; None: each file's own window."""

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        state = {
            "model": self.weights,
            "model_spec": self.spec.portable(),
            "hyperparameters": self.hyperparameters.to_dict(),
            "classes": list(self.classes),
            "metrics": self.metrics,
            "temperature": self.temperature,
        }
        if self.operating_point is not None:  # absent otherwise: a file without one is what it was before
            state["operating_point"] = dict(self.operating_point)
        if self.window is not None:  # likewise
            state["window"] = [float(value) for value in self.window]
        torch.save(state, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> ModelFile:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model = cls.from_trial_checkpoint(state, state["classes"])  # the same keys, plus the classes
        return replace(
            model,
            temperature=float(state.get("temperature", 1.0)),  # older files: uncalibrated
            operating_point=state.get("operating_point"),  # older files: none
            window=stored_window(state.get("window")),  # older files: none
        )

    @classmethod
    def from_trial_checkpoint(cls, state: dict, classes: list[str]) -> ModelFile:
        """The model of a trial checkpoint (its training state left behind)."""
        return cls(
            state["model"],
            ModelSpec.from_portable(state["model_spec"]),
            Hyperparameters.from_dict(state["hyperparameters"]),
            classes,
            state["metrics"],
        )


def stored_window(value: list | None) -> tuple[float, float] | None:
    """A model file's window as saved ([center, width]), or None."""
    return None if value is None else (float(value[0]), float(value[1]))
