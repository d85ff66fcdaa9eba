"""Typed configuration at the trainable's boundary, and the metric names used everywhere."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

# One spelling for every metric: Tune's `metric=`, checkpoint scoring, MLflow keys.
METRIC_MODES = {
    "val_acc": "max",
    "val_loss": "min",
    "val_balanced_acc": "max",
    "val_macro_f1": "max",
}
DEFAULT_METRIC = "val_acc"


@dataclass(frozen=True)
class Hyperparameters:
    """What the search may tune. Tune's config dict becomes this once, at the top of a trial."""

    lr: float = 3e-4
    """AdamW learning rate."""
    weight_decay: float = 0.05
    """AdamW weight decay."""
    batch_size: int = 32
    """Images per step (the seed's 32 fits 8 GB at 224 px with AMP)."""
    label_smoothing: float = 0.0
    """Cross-entropy label smoothing."""
    aug_strength: float = 0.5
    """Scales rotation, colour jitter and noise together; 0 turns augmentation off."""
    dropout: float = 0.2
    """cnn: the head's dropout (the seed's 0.2); vit and hybrid: dropout on pooled features."""
    drop_path_rate: float = 0.0
    """Stochastic depth in the backbones."""
    vit_depth: int = 12
    """vit and hybrid: ViT blocks kept (first N of 12)."""
    fusion: str = "seed"
    """hybrid: 'seed' (as written) or 'tokens' (two tokens that attend to each other)."""
    plateau_factor: float = 0.5
    """ReduceLROnPlateau: the factor the learning rate is multiplied by."""
    plateau_patience: int = 1
    """ReduceLROnPlateau: epochs without improvement before the learning rate drops."""
    early_stop_patience: int = 4
    """Epochs without improvement before a trial stops itself."""

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls, config: dict) -> "Hyperparameters":
        unknown = sorted(set(config) - set(cls.names()))
        if unknown:
            raise ValueError(f"unknown hyperparameter(s) {', '.join(unknown)}; valid: {', '.join(cls.names())}")
        types = {f.name: type(f.default) for f in fields(cls)}
        return cls(**{name: typed(name, value, types[name]) for name, value in config.items()})

    def to_dict(self) -> dict:
        return asdict(self)


def typed(name: str, value: object, kind: type) -> object:
    """value as the field's type; a non-finite number is refused (int() of one would overflow)."""
    if kind in (int, float) and isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{name}={value} is not a finite number")
    converted = kind(value)
    if kind is float and not math.isfinite(converted):
        raise ValueError(f"{name}={value!r} is not a finite number")
    return converted
