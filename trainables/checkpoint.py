"""Checkpoints and model files: the one module that writes and reads them.

Both are plain dicts saved with torch.save and loaded with weights_only=True (no
pickled code runs). A trial checkpoint holds the training state (model, optimizer,
scheduler, scaler, epoch, early-stopping state) to resume a trial; a model file holds
the weights and what it takes to rebuild and use the model (spec, hyperparameters,
classes, metrics): the study's best_model.pt and the final retrain's model.pt. A model
file may hold an ensemble (final.py --ensemble: its other members, each with its own
weights, spec and temperature) and the flips averaged at test time (--tta);
trainables.scoring turns any model file into the one network that scores images.
Neither holds a path of the machine that wrote it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from trainables.config import Hyperparameters
from trainables.spec import ModelSpec

if TYPE_CHECKING:  # the engine loads scikit-learn: predict.py reads model files without it
    from trainables.engine import Learner

FLIPS = ("hflip", "vflip")
"""The test-time flips a model file may name (ModelFile.tta): left-right and top-bottom."""
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
class Member:
    """One trained network of a model file: the file's first (its top-level fields) or one of its more_members."""

    weights: dict
    """The network's state dict."""
    spec: ModelSpec
    hyperparameters: Hyperparameters
    temperature: float = 1.0
    """This member's own calibration (ModelFile.temperature says what it does)."""
    metrics: dict = field(default_factory=dict)
    """This member's own scores (e.g. its test accuracy alone)."""
    label: str = ""
    """A short name for reports, e.g. its trial's 't07'; empty where it has none."""

    def portable(self) -> dict:
        """As saved among a model file's more_members."""
        return {
            "model": self.weights,
            "model_spec": self.spec.portable(),
            "hyperparameters": self.hyperparameters.to_dict(),
            "temperature": self.temperature,
            "metrics": self.metrics,
            "label": self.label,
        }

    @classmethod
    def from_portable(cls, state: dict) -> Member:
        return cls(
            state["model"],
            ModelSpec.from_portable(state["model_spec"]),
            Hyperparameters.from_dict(state["hyperparameters"]),
            float(state["temperature"]),
            state["metrics"],
            state["label"],
        )


@dataclass(frozen=True)
class ModelFile:
    """A trained model with what it takes to rebuild and use it: one network, or an ensemble whose first member
    is the top-level weights, spec, hyperparameters and temperature (the best one), and its flips at test time."""

    weights: dict
    """The model's state dict."""
    spec: ModelSpec
    hyperparameters: Hyperparameters
    classes: list[str]
    """Class names in output order."""
    metrics: dict
    """The model's scores: in an ensemble, the ensemble's (each member's own are in its Member.metrics)."""
    temperature: float = 1.0
    """Divides the logits before the softmax: fitted on the validation split by final.py (temperature
    scaling), so that the probabilities mean what they say; 1.0 for an uncalibrated model."""
    operating_point: dict | None = None
    """final.py --operating-point's threshold: {positive (a class name), threshold (on that class's calibrated
    probability: flagged at or above it), target ('sensitivity' or 'specificity'), target_value}; None: none."""
    window: tuple[float, float] | None = None
    """The (center, width) its DICOM training images were windowed with (run.py --window), which predict.py
    applies too; None: each file's own window."""
    more_members: tuple[Member, ...] = ()
    """An ensemble's other members, best first (after the top-level one); empty for a single model."""
    tta: tuple[str, ...] = ()
    """Flips (of FLIPS) whose probabilities are averaged with the image's own at test time; empty: none."""
    label: str = ""
    """The first member's label (Member.label); empty where it has none."""
    member_metrics: dict | None = None
    """The first member's own scores, where `metrics` are an ensemble's; None: `metrics` are its own."""
    ensemble_temperature: float = 1.0
    """T_ens: the average of the members' (and flips') calibrated probabilities rescaled as softmax(log p / T_ens),
    fitted on val by final.py; 1.0 (no change) for a single model without flips, or where nothing was fitted."""

    def __post_init__(self) -> None:
        problems = [
            f"unknown test-time flip {flip!r} (known: {', '.join(FLIPS)})" for flip in self.tta if flip not in FLIPS
        ]
        first = self.spec
        for member in self.more_members:
            if (member.spec.num_classes, member.spec.img_size) != (first.num_classes, first.img_size):
                problems.append(
                    f"member {member.label or '?'} has {member.spec.num_classes} classes at {member.spec.img_size} px,"
                    f" the first {first.num_classes} at {first.img_size} px: an ensemble's members score alike"
                )
        if self.ensemble_temperature != 1.0 and not (self.more_members or self.tta):
            problems.append(
                f"ensemble_temperature {self.ensemble_temperature:g} on a single model without flips: it averages "
                "nothing, its own temperature is `temperature`"
            )
        if not self.ensemble_temperature > 0:
            problems.append(f"ensemble_temperature {self.ensemble_temperature:g}: it must be positive")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def members(self) -> tuple[Member, ...]:
        """Every network, the first (from the top-level fields) first: one for a single model."""
        metrics = self.metrics if self.member_metrics is None else self.member_metrics
        first = Member(self.weights, self.spec, self.hyperparameters, self.temperature, metrics, self.label)
        return (first, *self.more_members)

    @classmethod
    def from_members(
        cls,
        members: Sequence[Member],
        classes: list[str],
        metrics: dict,
        tta: tuple[str, ...] = (),
        operating_point: dict | None = None,
        window: tuple[float, float] | None = None,
        ensemble_temperature: float = 1.0,
    ) -> ModelFile:
        """An ensemble's file (or a single model's, for one member): members best first, `metrics` the
        ensemble's (the first member's own kept as member_metrics); the other fields as ModelFile's."""
        first, *more = members
        return cls(
            first.weights,
            first.spec,
            first.hyperparameters,
            classes,
            metrics,
            temperature=first.temperature,
            more_members=tuple(more),
            label=first.label,
            member_metrics=first.metrics if more else None,
            tta=tta,
            operating_point=operating_point,
            window=window,
            ensemble_temperature=ensemble_temperature,
        )

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
        if self.more_members:  # likewise, as are the three below
            state["more_members"] = [member.portable() for member in self.more_members]
        if self.tta:
            state["tta"] = list(self.tta)
        if self.label:
            state["label"] = self.label
        if self.member_metrics is not None:
            state["member_metrics"] = self.member_metrics
        if self.ensemble_temperature != 1.0:
            state["ensemble_temperature"] = float(self.ensemble_temperature)
        torch.save(state, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> ModelFile:
        return cls.from_saved(torch.load(path, map_location="cpu", weights_only=True))

    @classmethod
    def from_saved(cls, state: dict) -> ModelFile:
        """The model file of a dict as `save` wrote it (or an older version of it)."""
        model = cls.from_trial_checkpoint(state, state["classes"])  # the same keys, plus the classes
        return replace(
            model,
            temperature=float(state.get("temperature", 1.0)),  # older files: uncalibrated
            operating_point=state.get("operating_point"),  # older files: none
            window=stored_window(state.get("window")),  # older files: none
            more_members=tuple(Member.from_portable(member) for member in state.get("more_members", ())),  # single
            tta=tuple(state.get("tta", ())),  # older files: no flips
            label=str(state.get("label", "")),
            member_metrics=state.get("member_metrics"),
            ensemble_temperature=float(state.get("ensemble_temperature", 1.0)),  # older files: none
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
