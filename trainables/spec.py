"""What decides a model's architecture, and its checks: plain data, free of torch.

The search validates a study's model before it loads torch or starts Ray; models.py
builds the network from the same ModelSpec.
"""

from __future__ import annotations

from dataclasses import dataclass

CNN_BACKBONE = "tf_efficientnetv2_s"
VIT_BACKBONE = "vit_tiny_patch16_224"
VIT_PATCH = 16
VIT_FULL_DEPTH = 12

MODEL_NAMES = ("cnn", "vit", "hybrid")
BACKBONES = {"cnn": (CNN_BACKBONE,), "vit": (VIT_BACKBONE,), "hybrid": (CNN_BACKBONE, VIT_BACKBONE)}
FUSIONS = ("seed", "tokens")


@dataclass(frozen=True)
class ModelSpec:
    """Everything that decides a model's architecture (not its training)."""

    name: str
    """One of MODEL_NAMES."""
    num_classes: int
    img_size: int = 224
    dropout: float = 0.2
    """cnn: the head's Dropout (the seed's 0.2). vit and hybrid: dropout on the pooled
    backbone features, so that their seed heads stay exactly as written."""
    drop_path_rate: float = 0.0
    """Stochastic depth inside the backbones."""
    vit_depth: int = VIT_FULL_DEPTH
    """ViT blocks kept (the first N of the pretrained 12)."""
    fusion: str = "seed"
    """Hybrid only: 'seed' as written, or 'tokens' (CNN and ViT features as two tokens)."""
    pretrained: bool = True
    weights_files: tuple[tuple[str, str], ...] = ()
    """(backbone, path) pairs: local weights files used instead of the hub download."""


def validate_spec(spec: ModelSpec) -> None:
    problems = []
    if spec.name not in MODEL_NAMES:
        problems.append(f"unknown model {spec.name!r}: choose one of {', '.join(MODEL_NAMES)}")
    if spec.num_classes < 2:
        problems.append(f"num_classes is {spec.num_classes}: a classifier needs at least 2 classes")
    if spec.name in ("vit", "hybrid") and spec.img_size % VIT_PATCH:
        problems.append(
            f"img_size {spec.img_size} is not a multiple of the ViT patch ({VIT_PATCH}): use e.g. 32 or 224"
        )
    if not 1 <= spec.vit_depth <= VIT_FULL_DEPTH:
        problems.append(f"vit_depth {spec.vit_depth} is outside 1..{VIT_FULL_DEPTH}")
    if spec.fusion not in FUSIONS:
        problems.append(f"unknown fusion {spec.fusion!r}: choose one of {', '.join(FUSIONS)}")
    if problems:
        raise ValueError("; ".join(problems))
