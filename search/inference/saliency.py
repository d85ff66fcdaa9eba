"""Where the model looked: a Grad-CAM heat map of the predicted class, blended over the image.

Grad-CAM (Selvaraju et al., 2017) weighs a layer's feature maps by the gradient of the
class score with respect to them, keeps the positive part and scales it to [0, 1] per
image. The layer, per model:

- cnn and hybrid: the EfficientNetV2 backbone's last convolution (conv_head, normalised
  and activated by bn2): the 1280 maps its pooling reads, at 1/32 of the input size.
  For a hybrid the map shows the evidence of its CNN branch.
- vit: the last block's normalised input (blocks[-1].norm1), its patch tokens laid out
  on the 16-pixel patch grid. Not the block's output: only its class token reaches the
  head, so there the patch tokens get no gradient.

One forward pass gives both the logits (the CSV's probabilities) and the maps, and the
backward pass stops at that layer.

pytorch-grad-cam (grad-cam on PyPI) computes it: from 1.5.7 it depends on headless
OpenCV, which needs no libGL. It loads only with --explain.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import nn

from search.inference.predictor import LoadedModel, as_input
from trainables.spec import VIT_PATCH

EXPLAINED_MODELS = ("cnn", "vit", "hybrid")
SHOWN_SIZE = 224
"""Overlays are drawn at least this large, whatever the model's input size: a 32 px one is too small to read."""
HEAT_WEIGHT = 0.5
"""The heat map's share of the blend; the image keeps the rest."""


def explain_problem(model_name: str) -> str | None:
    """Why --explain cannot explain this model, or None."""
    if model_name in EXPLAINED_MODELS:
        return None
    return f"--explain covers {', '.join(EXPLAINED_MODELS)} models; this one is a {model_name}: predict without it"


@dataclass(frozen=True)
class CamLayer:
    layer: nn.Module
    reshape: Callable[[torch.Tensor], torch.Tensor] | None
    """Turns the layer's tokens into (N, C, h, w) maps; None for a convolution's maps."""
    grid: tuple[int, int]
    """The heat map's resolution before it is scaled to the image."""


def cam_layer(model: LoadedModel) -> CamLayer:
    backbones: Any = model.network.backbones  # a ModuleList of Normalized timm models (trainables.models)
    backbone = backbones[0].backbone  # the CNN of a hybrid comes first
    size = model.spec.img_size
    if model.spec.name == "vit":
        grid = (size // VIT_PATCH, size // VIT_PATCH)
        return CamLayer(backbone.blocks[-1].norm1, patch_grid(backbone.num_prefix_tokens, grid), grid)
    side = math.ceil(size / backbone.feature_info[-1]["reduction"])
    return CamLayer(backbone.bn2, None, (side, side))


def patch_grid(prefix_tokens: int, grid: tuple[int, int]) -> Callable[[torch.Tensor], torch.Tensor]:
    """(N, prefix + h*w, C) tokens → (N, C, h, w): the class token dropped, the patches back in place."""

    def reshape(tokens: torch.Tensor) -> torch.Tensor:
        patches = tokens[:, prefix_tokens:, :]
        return patches.reshape(patches.size(0), *grid, patches.size(2)).permute(0, 3, 1, 2)

    return reshape


def explain(
    model: LoadedModel, images: np.ndarray, classes: np.ndarray | None = None
) -> tuple[torch.Tensor, np.ndarray]:
    """The images' logits and their heat maps, (N, H, W) float32 in [0, 1], from one forward pass: each
    image's Grad-CAM for its class in `classes`, by default the class the logits predict."""
    # Deferred: pytorch-grad-cam loads OpenCV, SciPy and torchvision's models.
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    target = cam_layer(model)
    logits: list[torch.Tensor] = []
    # Registered before GradCAM's own hooks, so that they see the cut; and GradCAM's live only as long as
    # the object: the plain prediction passes must not feed them.
    hooks = [
        target.layer.register_forward_hook(gradients_start_here),
        model.network.register_forward_hook(lambda module, inputs, output: logits.append(output.detach())),
    ]
    try:
        with GradCAM(model=model.network, target_layers=[target.layer], reshape_transform=target.reshape) as cam:
            # None: GradCAM explains each image's highest logit, the class the probabilities predict.
            targets = None if classes is None else [ClassifierOutputTarget(int(c)) for c in classes]
            maps = cam(input_tensor=as_input(images, model.device), targets=targets)
    finally:
        for hook in hooks:
            hook.remove()
    return logits[0], maps


def gradients_start_here(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    """The layer's output as a leaf that wants its gradient. Grad-CAM needs the gradient here and nowhere
    below, and the model's weights are frozen (predictor.load_model): the backward pass then runs through
    the head alone instead of the whole backbone, several times faster on a CPU."""
    return output.detach().requires_grad_()


def overlay(image: np.ndarray, heat: np.ndarray, title: str) -> Image.Image:
    """The image with its heat map blended in (jet: red is where the class's evidence is), under a title."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    side = max(SHOWN_SIZE, image.shape[0])
    shown = np.asarray(Image.fromarray(image).resize((side, side), Image.Resampling.BILINEAR), dtype=np.float32)
    scaled_heat = np.asarray(Image.fromarray(heat).resize((side, side), Image.Resampling.BILINEAR))
    blended = show_cam_on_image(shown / 255, scaled_heat.clip(0, 1), use_rgb=True, image_weight=1 - HEAT_WEIGHT)
    return titled(Image.fromarray(blended), title)


def titled(picture: Image.Image, title: str) -> Image.Image:
    band = max(18, picture.height // 10)
    canvas = Image.new("RGB", (picture.width, picture.height + band), "white")
    canvas.paste(picture, (0, band))
    font = ImageFont.load_default(size=int(band * 0.7))
    ImageDraw.Draw(canvas).text((4, band // 2), title, fill="black", font=font, anchor="lm")
    return canvas


def overlay_path(folder: Path, relative: str) -> Path:
    """folder/<relative path>.png: the image's own suffix kept, so a.jpg and a.png do not share an overlay."""
    return folder / f"{relative}.png"
