"""What every shipped form of a model computes: images in, calibrated class probabilities out.

A model file (trainables.checkpoint.ModelFile) holds one network or an ensemble, each member
with its own temperature, and perhaps flips to average at test time (its `tta`). Its scoring
network takes float32 images (N, 3, H, W) in [0, 1] and returns (N, C) probabilities:

    for each member m:   p_m = mean over the views v (the image, then each flip) of softmax(logits_mv / T_m)
    p_avg               = mean over the members of p_m
    probabilities       = softmax(log(p_avg) / T_ens)

T_ens, the file's ensemble_temperature, is fitted on val to the averaged log-probabilities by final.py
(an average of calibrated members is under-confident); 1 (no change) for a single model without flips,
or where nothing was fitted.
The registered MLflow graph, model.onnx and predict.py all compute it from this module, and
final.py's test computes the same from logits already at hand with `averaged_probabilities`,
its numpy twin (float64), so that the tested numbers are the shipped model's. Each member
normalises the images itself (trainables.models), so a flip is applied to the [0, 1] input.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import torch
from torch import nn

from trainables.checkpoint import FLIPS, Member, ModelFile
from trainables.models import build_model

FLIP_AXES = {"hflip": -1, "vflip": -2}
"""The axis each flip of checkpoint.FLIPS reverses, counted from the end: width, then height. The same for a
(N, 3, H, W) tensor and, shifted by one, for cached (N, H, W, 3) images (flipped_images)."""


class CalibratedSoftmax(nn.Module):
    """softmax(logits / temperature): the final run's temperature (search/evaluation/calibration.py), so
    that the shipped model outputs calibrated probabilities; the export keeps it as a constant."""

    def __init__(self, temperature: float):
        super().__init__()
        self.temperature = float(temperature)

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits / self.temperature, dim=1)


class ScoringNetwork(nn.Module):
    """Members' networks, each with its temperature, averaged over the identity and each flip: see the module's
    docstring. One member and no flips computes exactly network -> CalibratedSoftmax, the graph of a single model."""

    def __init__(
        self,
        networks: Sequence[nn.Module],
        temperatures: Sequence[float],
        flips: Sequence[str] = (),
        ensemble_temperature: float = 1.0,
    ):
        super().__init__()
        if not networks or len(networks) != len(temperatures):
            raise ValueError(f"{len(networks)} networks and {len(temperatures)} temperatures: give one of each")
        unknown = [flip for flip in flips if flip not in FLIP_AXES]
        if unknown:
            raise ValueError(f"unknown flips {unknown} (known: {', '.join(FLIPS)})")
        self.networks = nn.ModuleList(networks)
        self.calibrations = nn.ModuleList(CalibratedSoftmax(t) for t in temperatures)
        self.temperatures = tuple(float(t) for t in temperatures)
        self.flips = tuple(flips)
        self.ensemble_temperature = float(ensemble_temperature)
        self.eval()  # for scoring only: dropout off, whatever mode its networks were handed in

    def views(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The images as each member sees them: themselves, then flipped as each of `flips` says."""
        return [images, *(images.flip(FLIP_AXES[flip]) for flip in self.flips)]

    def view_logits(self, images: torch.Tensor) -> list[list[torch.Tensor]]:
        """Logits [member][view], each (N, C): what averaged_probabilities takes (stacked, as numpy)."""
        views = self.views(images)
        return [[network(view) for view in views] for network in self.networks]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        views = self.views(images)
        per_member = []
        for network, calibration in zip(self.networks, self.calibrations, strict=True):
            probabilities = [calibration(network(view)) for view in views]
            per_member.append(probabilities[0] if len(views) == 1 else torch.stack(probabilities).mean(dim=0))
        averaged = per_member[0] if len(per_member) == 1 else torch.stack(per_member).mean(dim=0)
        if self.ensemble_temperature == 1.0:
            return averaged  # a single model's graph stays network -> CalibratedSoftmax
        tiny = torch.finfo(averaged.dtype).tiny  # a probability that underflowed to 0 keeps a finite log
        return torch.softmax(torch.log(averaged.clamp_min(tiny)) / self.ensemble_temperature, dim=1)


class WeightsMismatch(RuntimeError):
    """A member's weights that do not fit its spec (load_state_dict's list of keys, too long to show, is its
    cause)."""


def scoring_network(model_file: ModelFile) -> ScoringNetwork:
    """The model file's scoring network, on the CPU (in eval mode, as every ScoringNetwork): each member rebuilt
    from its spec (without timm's pretrained download: the weights come from the file) with its weights loaded;
    WeightsMismatch names a member whose weights do not fit its spec."""
    members = model_file.members
    networks = []
    for number, member in enumerate(members, start=1):
        network = build_model(replace(member.spec, pretrained=False))
        try:
            network.load_state_dict(member.weights)
        except RuntimeError as error:
            labelled = f" ({member.label})" if member.label else ""
            whose = "its weights" if len(members) == 1 else f"the weights of member {number}{labelled}"
            raise WeightsMismatch(f"{whose} do not fit its model_spec") from error
        networks.append(network)
    temperatures = [member.temperature for member in model_file.members]
    return ScoringNetwork(networks, temperatures, model_file.tta, model_file.ensemble_temperature)


def member_name(member: Member, number: int) -> str:
    """A member as reports name it: its label, or 'member N' (counted from 1) where it has none."""
    return member.label or f"member {number}"


def forward_passes(model_file: ModelFile) -> int:
    """Forward passes per image: members x (1 + flips), the cost of one prediction in single-model passes."""
    return len(model_file.members) * (1 + len(model_file.tta))


def scoring_summary(model_file: ModelFile) -> str:
    """What scores an image and its cost, for a header line: 'ensemble of 3 (t07, t03, t12), flips hflip: 6
    forward passes per image'; '' for a single model without flips (one pass, as ever)."""
    members, passes = model_file.members, forward_passes(model_file)
    flips = f"flips {', '.join(model_file.tta)}" if model_file.tta else "no flips"
    if len(members) == 1:
        return f"{flips}: {passes} forward passes per image" if model_file.tta else ""
    names = ", ".join(member_name(member, number) for number, member in enumerate(members, start=1))
    return f"ensemble of {len(members)} ({names}), {flips}: {passes} forward passes per image"


def averaged_probabilities(
    logits: np.ndarray | Sequence, temperatures: Sequence[float], ensemble_temperature: float = 1.0
) -> np.ndarray:
    """The scoring network's probabilities from its logits: (N, C) float64.

    `logits`: (members, views, N, C), each member's logits of the same views in the same order (the image,
    then each flip of its model file's tta: ScoringNetwork.view_logits), as an array or nested lists;
    `temperatures`: one per member. softmax(logits / T) per member and view, averaged over the views, then
    over the members, then softmax(log(average) / ensemble_temperature): what ScoringNetwork.forward computes,
    in float64.
    """
    stacked = np.asarray(logits, dtype=np.float64)
    if stacked.ndim != 4 or len(stacked) != len(temperatures):
        raise ValueError(
            f"logits of shape {stacked.shape} and {len(temperatures)} temperatures: give (members, views, N, C) "
            f"logits and one temperature per member"
        )
    scaled = stacked / np.asarray(temperatures, dtype=np.float64)[:, None, None, None]
    scaled -= scaled.max(axis=-1, keepdims=True)  # exp of at most 0: no overflow
    probabilities = np.exp(scaled)
    probabilities /= probabilities.sum(axis=-1, keepdims=True)
    averaged = probabilities.mean(axis=1).mean(axis=0)
    if ensemble_temperature == 1.0:
        return averaged
    scaled = np.log(np.clip(averaged, np.finfo(np.float64).tiny, 1.0)) / float(ensemble_temperature)
    scaled -= scaled.max(axis=-1, keepdims=True)
    rescaled = np.exp(scaled)
    return rescaled / rescaled.sum(axis=-1, keepdims=True)


def flipped_images(images: np.ndarray, flip: str) -> np.ndarray:
    """Cached images (N, H, W, 3) flipped as ScoringNetwork flips its input: for a test that predicts each view
    with its own loop, then averages with averaged_probabilities."""
    return np.ascontiguousarray(np.flip(images, axis=FLIP_AXES[flip] - 1))
