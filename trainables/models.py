"""The three classifiers of the seed document, and a larger reference to compare them with, built by one factory.

Every model takes float images in [0, 1], shape (B, 3, H, W), and normalises them
itself with its backbone's mean and std: the hybrid's two backbones may disagree,
and a model that carries its own normalisation can be used without this project.
"""

from __future__ import annotations

import difflib
from typing import Any

import timm
import torch
from torch import nn

# The specification lives apart from torch, so the search can check it before loading torch.
from trainables.spec import CNN_BACKBONE, REFERENCE, VIT_BACKBONE, ModelSpec, validate_spec

__all__ = ["Classifier", "ModelSpec", "build_model", "count_parameters", "reference_problem"]


class Normalized(nn.Module):
    """A timm backbone (num_classes=0) or a whole timm classifier that normalises its [0, 1] input first."""

    def __init__(self, backbone: Any):
        super().__init__()
        cfg = backbone.pretrained_cfg
        self.mean: torch.Tensor
        self.std: torch.Tensor
        self.register_buffer("mean", torch.tensor(cfg["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg["std"]).view(1, 3, 1, 1), persistent=False)
        self.backbone = backbone
        self.num_features = backbone.num_features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone((images - self.mean) / self.std)


class Classifier(nn.Module):
    """One or more normalised backbones whose pooled features feed a head."""

    def __init__(self, backbones: list[nn.Module], head: nn.Module):
        super().__init__()
        self.backbones = nn.ModuleList(Normalized(b) for b in backbones)
        self.head = head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = [backbone(images) for backbone in self.backbones]
        return self.head(features[0] if len(features) == 1 else features)


class SingleTokenFusionHead(nn.Module):
    """fusion='single_token', the seed's hybrid head as written: attention over a sequence of one vector."""

    def __init__(self, cnn_features: int, vit_features: int, num_classes: int):
        super().__init__()
        self.fuse = nn.Sequential(
            nn.Linear(cnn_features + vit_features, 256),
            nn.LayerNorm(256),
            nn.GELU(),
            nn.Linear(256, 128),
            nn.GELU(),
        )
        self.attention = nn.MultiheadAttention(128, num_heads=2, batch_first=True)
        self.classifier = nn.Linear(128, num_classes)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        fused = self.fuse(torch.cat(features, dim=1)).unsqueeze(1)  # (B, 1, 128)
        attended, _ = self.attention(fused, fused, fused, need_weights=False)
        return self.classifier(attended.squeeze(1))


class TwoTokenFusionHead(nn.Module):
    """fusion='two_tokens': the CNN and ViT features become two tokens that attend to each other.

    With one token (the seed's head) attention reduces to a linear map; with two, each
    branch can weigh the other's evidence per image.
    """

    def __init__(self, cnn_features: int, vit_features: int, num_classes: int):
        super().__init__()
        self.to_tokens = nn.ModuleList(
            nn.Sequential(nn.Linear(n, 256), nn.LayerNorm(256), nn.GELU(), nn.Linear(256, 128), nn.GELU())
            for n in (cnn_features, vit_features)
        )
        self.attention = nn.MultiheadAttention(128, num_heads=2, batch_first=True)
        self.classifier = nn.Linear(128, num_classes)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        tokens = torch.stack([proj(f) for proj, f in zip(self.to_tokens, features, strict=True)], dim=1)  # (B, 2, 128)
        attended, _ = self.attention(tokens, tokens, tokens, need_weights=False)
        return self.classifier((tokens + attended).mean(dim=1))


def cnn_head(features: int, num_classes: int, dropout: float) -> nn.Module:
    return nn.Sequential(nn.Dropout(dropout), nn.Linear(features, 256), nn.ReLU(), nn.Linear(256, num_classes))


def vit_head(features: int, num_classes: int) -> nn.Module:
    return nn.Sequential(nn.LayerNorm(features), nn.Linear(features, 256), nn.GELU(), nn.Linear(256, num_classes))


def create_backbone(
    name: str, spec: ModelSpec, drop_rate: float, num_classes: int = 0, dynamic_size: bool = False
) -> Any:
    """A timm model, pretrained if asked: a backbone without classifier (num_classes=0), or with
    timm's own head of num_classes outputs (a reference). dynamic_size: the ViT takes images smaller than
    spec.img_size too (build_model's).

    Typed Any: timm's models carry pretrained_cfg, num_features and (ViT) blocks, which nn.Module does not declare.
    """
    kwargs: dict[str, Any] = dict(num_classes=num_classes, drop_rate=drop_rate, drop_path_rate=spec.drop_path_rate)
    if name == VIT_BACKBONE or fixed_input_size(name):
        kwargs["img_size"] = spec.img_size  # timm resamples the position embedding
    if name == VIT_BACKBONE and dynamic_size:
        # Each batch's position embeddings resampled to its grid: the same parameters at every size.
        kwargs["dynamic_img_size"] = True
    weights_file = dict(spec.weights_files).get(name)
    if spec.pretrained and weights_file:
        kwargs["pretrained_cfg_overlay"] = dict(file=weights_file)
    backbone: Any = timm.create_model(name, pretrained=spec.pretrained, **kwargs)
    # vit_depth is a knob of our vit and hybrid; a reference that happens to be this ViT stays whole.
    if name == VIT_BACKBONE and spec.name != REFERENCE and spec.vit_depth < len(backbone.blocks):
        backbone.blocks = backbone.blocks[: spec.vit_depth]
    return backbone


def fixed_input_size(name: str) -> bool:
    """Whether timm builds the model for one input size (ViTs, Swin): it must be told img_size then,
    or a reference at any other size fails on its first batch. Convolutional models take any size."""
    cfg = timm.models.get_pretrained_cfg(name)
    return bool(cfg is not None and cfg.fixed_input_size)


def reference_problem(name: str) -> str | None:
    """None when timm knows the model `name` (a pretrained tag such as '.fb_in1k' allowed), else a one-line
    message with the fix: checked before a comparison starts, not after the lightweight models are done."""
    if name and timm.is_model(name):
        return None
    close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
    examples = ", ".join(close) if close else "convnext_tiny, resnet50"
    hint = "did you mean" if close else "e.g."
    return f"--reference {name or repr(name)} is not a timm model: pick one of timm.list_models(), {hint} {examples}"


def build_model(spec: ModelSpec, dynamic_size: bool = False) -> Classifier:
    """The seed's architecture for spec.name, with its head exactly as the seed wrote it; or the reference,
    a timm classifier with timm's own head (how one fine-tunes a larger model).

    dynamic_size: the ViT (of vit and hybrid) also takes images smaller than spec.img_size, for a trial whose
    early epochs train at smaller sizes (resolution as a fidelity). Its parameters and state dict are the same,
    so a checkpoint rebuilds as the fixed-size model that final.py, predict.py and the ONNX export use."""
    validate_spec(spec)
    if spec.name == REFERENCE:
        model = create_backbone(spec.backbone, spec, drop_rate=spec.dropout, num_classes=spec.num_classes)
        return Classifier([model], nn.Identity())
    if spec.name == "cnn":
        cnn = create_backbone(CNN_BACKBONE, spec, drop_rate=0.0)
        return Classifier([cnn], cnn_head(cnn.num_features, spec.num_classes, spec.dropout))
    if spec.name == "vit":
        vit = create_backbone(VIT_BACKBONE, spec, drop_rate=spec.dropout, dynamic_size=dynamic_size)
        return Classifier([vit], vit_head(vit.num_features, spec.num_classes))
    cnn = create_backbone(CNN_BACKBONE, spec, drop_rate=spec.dropout)
    vit = create_backbone(VIT_BACKBONE, spec, drop_rate=spec.dropout, dynamic_size=dynamic_size)
    head_type = SingleTokenFusionHead if spec.fusion == "single_token" else TwoTokenFusionHead
    return Classifier([cnn, vit], head_type(cnn.num_features, vit.num_features, spec.num_classes))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
