"""What decides a model's architecture, and its checks: plain data, free of torch.

The search validates a study's model before it loads torch or starts Ray; models.py
builds the network from the same ModelSpec. The knobs that shape the model take their
defaults and bounds from trainables.config, their one home.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from trainables.config import (
    DEFAULTS,
    FUSIONS,
    MODEL_NAMES,
    Hyperparameters,
    renamed,
    value_problem,
)

CNN_BACKBONE = "tf_efficientnetv2_s"
VIT_BACKBONE = "vit_tiny_patch16_224"
VIT_PATCH = 16
BACKBONES = {"cnn": (CNN_BACKBONE,), "vit": (VIT_BACKBONE,), "hybrid": (CNN_BACKBONE, VIT_BACKBONE)}
REFERENCE = "reference"
"""A larger timm classifier (ModelSpec.backbone names it), trained once with the recipe's default
hyperparameters to compare the lightweight models against: not one of MODEL_NAMES, never searched."""
LOCAL_FIELDS = ("weights_files",)
"""Paths on the machine that trained: never written into a checkpoint or model file."""


@dataclass(frozen=True)
class ModelSpec:
    """Everything that decides a model's architecture (not its training).

    dropout, drop_path_rate, vit_depth and fusion are the hyperparameters of the same
    names (trainables.config.Hyperparameters says what each does).
    """

    name: str
    """One of MODEL_NAMES, or REFERENCE."""
    num_classes: int
    img_size: int = 224
    dropout: float = DEFAULTS.dropout
    drop_path_rate: float = DEFAULTS.drop_path_rate
    vit_depth: int = DEFAULTS.vit_depth
    fusion: str = DEFAULTS.fusion
    backbone: str = ""
    """The timm model name of a reference (name == REFERENCE); empty for cnn, vit and hybrid,
    whose backbones are fixed (BACKBONES). Model files written before it existed load with the default."""
    pretrained: bool = True
    weights_files: tuple[tuple[str, str], ...] = ()
    """(backbone, path) pairs: local weights files used instead of the hub download."""

    def with_knobs(self, hp: Hyperparameters) -> ModelSpec:
        """This spec with a trial's (or the winner's) architecture knobs."""
        return replace(self, **hp.model_knobs())

    def portable(self) -> dict:
        """As a plain dict without the local paths: what checkpoints and model files hold."""
        return {key: value for key, value in asdict(self).items() if key not in LOCAL_FIELDS}

    @classmethod
    def from_portable(cls, values: dict) -> ModelSpec:
        """The spec a checkpoint or model file holds (old value names renamed)."""
        kept: dict[str, Any] = {key: renamed(key, value) for key, value in values.items() if key not in LOCAL_FIELDS}
        return cls(**kept)


def backbones_of(spec: ModelSpec) -> tuple[str, ...]:
    """The timm names whose pretrained weights the model needs (what to download or find locally)."""
    return (spec.backbone,) if spec.name == REFERENCE else BACKBONES[spec.name]


def validate_spec(spec: ModelSpec) -> None:
    problems = []
    if spec.name == REFERENCE:
        if not spec.backbone:
            problems.append("a reference model needs its timm name (backbone), e.g. convnext_tiny")
    elif spec.name not in MODEL_NAMES:
        problems.append(f"unknown model {spec.name!r}: choose one of {', '.join(MODEL_NAMES)}")
    elif spec.backbone:
        problems.append(
            f"{spec.name} has its backbones fixed ({', '.join(BACKBONES[spec.name])}): backbone={spec.backbone!r} "
            f"is for a reference model only; leave it empty"
        )
    if spec.num_classes < 2:
        problems.append(f"num_classes is {spec.num_classes}: a classifier needs at least 2 classes")
    if spec.name in ("vit", "hybrid") and spec.img_size % VIT_PATCH:
        problems.append(
            f"img_size {spec.img_size} is not a multiple of the ViT patch ({VIT_PATCH}): use e.g. 32 or 224"
        )
    depth = value_problem("vit_depth", spec.vit_depth)  # its bounds live with the knob
    if depth:
        problems.append(depth)
    if spec.fusion not in FUSIONS:
        problems.append(f"unknown fusion {spec.fusion!r}: choose one of {', '.join(FUSIONS)}")
    if problems:
        raise ValueError("; ".join(problems))
