"""The model rebuilt from its model file, on a device, giving calibrated class probabilities.

Probabilities are softmax(logits / temperature), with the temperature final.py fitted
on the validation split (1.0 in a file that has none): what the registered graph
outputs too. Computed in float32, without autocast, so the CSV does not depend on
the device's half-precision arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from search.errors import UsageError, one_line
from trainables.checkpoint import ModelFile
from trainables.models import build_model
from trainables.spec import ModelSpec


@dataclass(frozen=True)
class LoadedModel:
    network: nn.Module
    """In eval mode, on `device`."""
    spec: ModelSpec
    classes: list[str]
    temperature: float
    device: torch.device


def load_model(path: Path, device: torch.device, shown_as: str) -> LoadedModel:
    """The model of a model file (final.py's model.pt or a study's best_model.pt), its weights loaded;
    `shown_as` names it in the error when the file is not one."""
    try:
        model_file = ModelFile.load(path)
    except Exception as error:  # torch.load's unpickling errors and missing keys alike
        raise UsageError(
            f"--model {shown_as} is not a model file written by search/final.py or a study ({one_line(error)})"
        ) from None
    # The weights come from the file: timm must not download its pretrained ones first.
    spec = replace(model_file.spec, pretrained=False)
    network = build_model(spec)
    network.load_state_dict(model_file.weights)
    network.requires_grad_(False)  # never trained here; saliency asks for the gradients it needs
    return LoadedModel(network.to(device).eval(), spec, model_file.classes, model_file.temperature, device)


def as_input(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """(N, H, W, 3) uint8 → (N, 3, H, W) float32 in [0, 1] on the device: what every model takes."""
    batch = torch.from_numpy(images).to(device, non_blocking=True)
    return batch.permute(0, 3, 1, 2).float().div_(255)


def calibrated_probabilities(model: LoadedModel, images: np.ndarray) -> np.ndarray:
    """(N, C) class probabilities, float64 on the CPU."""
    with torch.inference_mode():
        return calibrated(model.network(as_input(images, model.device)), model.temperature)


def calibrated(logits: torch.Tensor, temperature: float) -> np.ndarray:
    """softmax(logits / temperature), float64 on the CPU."""
    return torch.softmax(logits.double() / temperature, dim=1).cpu().numpy()


def select_device(choice: str) -> torch.device:
    """--device auto|cpu|cuda; cuda without a visible GPU is a one-line UsageError."""
    from trainables.engine import select_device as engine_device

    if choice == "cpu":
        return torch.device("cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise UsageError(
            "--device cuda: no CUDA GPU is visible here (torch.cuda.is_available() is False); use --device auto or cpu"
        )
    return engine_device()
