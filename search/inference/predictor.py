"""The model rebuilt from its model file, on a device, giving calibrated class probabilities.

Probabilities are softmax(logits / temperature), with the temperature final.py fitted
on the validation split (1.0 in a file that has none): what the registered graph
outputs too. An ensemble's file, or one with test-time flips, is its scoring network
(trainables.scoring): each member's probabilities averaged over the image and its flips,
then over the members. Logits in float32, without autocast, so the CSV does not depend
on the device's half-precision arithmetic; the softmax and the averages in float64.
"""

from __future__ import annotations

import pickle
import warnings
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from search.errors import UsageError, one_line
from search.inference.output import FlagRule
from trainables.checkpoint import ModelFile
from trainables.scoring import (
    ScoringNetwork,
    WeightsMismatch,
    averaged_probabilities,
    member_name,
    scoring_network,
    scoring_summary,
)
from trainables.spec import ModelSpec

MODEL_FILE_KEYS = ("model", "model_spec", "hyperparameters", "classes", "metrics")
"""What a model file holds (trainables.checkpoint.ModelFile.save), temperature aside: files before it had none."""
MEMBER_KEYS = ("model", "model_spec", "hyperparameters", "temperature", "metrics", "label")
"""What each of an ensemble's more_members holds (trainables.checkpoint.Member.portable)."""
TRIAL_CHECKPOINT_KEYS = {"model", "optimizer", "model_spec"}
"""Keys that make a dict a trial checkpoint (trainables.checkpoint.save_trial_checkpoint)."""
ZIP_MAGIC = b"PK\x03\x04"
HEAD_BYTES = 512
"""Bytes read to tell a text file from others."""


@dataclass(frozen=True)
class LoadedModel:
    scoring: ScoringNetwork
    """Every member and flip of the model file, in eval mode, on `device`."""
    spec: ModelSpec
    """The first member's (an ensemble's members share the image size and classes)."""
    classes: list[str]
    temperature: float
    """The first member's."""
    device: torch.device
    flag: FlagRule | None = None
    """The model file's operating point (final.py --operating-point), or None: the CSV's flagged column."""
    window: tuple[float, float] | None = None
    """The model file's DICOM window (its study's --window), or None: each file's own."""
    summary: str = ""
    """trainables.scoring.scoring_summary: its members, flips and forward passes; '' for one network, no flips."""
    first_member: str = ""
    """The first member as reports name it (what --explain explains in an ensemble)."""

    @property
    def network(self) -> nn.Module:
        """The first member's network: the single model, or the one --explain explains in an ensemble."""
        return self.scoring.networks[0]

    @property
    def single(self) -> bool:
        """One network and no flips: its probabilities are one forward pass's."""
        return len(self.scoring.networks) == 1 and not self.scoring.flips


def load_model(path: Path, device: torch.device, shown_as: str) -> LoadedModel:
    """The model of a model file (final.py's model.pt or a study's best_model.pt), its weights loaded;
    `shown_as` names it in the error when the file is not one."""
    try:
        with warnings.catch_warnings():  # torch's warnings on a file that is no model file (its pickle protocol)
            warnings.simplefilter("ignore")
            model_file = ModelFile.load(path)
    except Exception:  # torch.load's unpickling errors and missing keys alike: say what the file is instead
        raise UsageError(not_a_model_file(shown_as, what_file_is(path))) from None
    # The weights come from the file: timm must not download its pretrained ones first.
    spec = replace(model_file.spec, pretrained=False)
    try:
        scoring = scoring_network(model_file)
    except WeightsMismatch as error:  # its cause lists every missing and unexpected key: too long to be of use
        raise UsageError(not_a_model_file(shown_as, str(error))) from None
    scoring.requires_grad_(False)  # never trained here; saliency asks for the gradients it needs
    flag = None
    if model_file.operating_point is not None:
        try:
            flag = FlagRule.from_record(model_file.operating_point, model_file.classes)
        except (ValueError, KeyError, TypeError) as error:
            raise UsageError(not_a_model_file(shown_as, f"{one_line(error)}")) from None
    return LoadedModel(
        scoring.to(device).eval(),
        spec,
        model_file.classes,
        model_file.temperature,
        device,
        flag,
        model_file.window,
        scoring_summary(model_file),
        member_name(model_file.members[0], 1),
    )


def not_a_model_file(shown_as: str, cause: str) -> str:
    """The one line for a --model that is no model file, with what it is where we can tell."""
    reason = f" ({cause})" if cause else ""
    return (
        f"--model {shown_as} is not a model file written by search/final.py or a study{reason}: give final.py's "
        f"model.pt (or its results folder) or a study's best_model.pt"
    )


def what_file_is(path: Path) -> str:
    """What a file that ModelFile.load refused is, in a few words of our own (never torch's advice to load it
    with weights_only=False, which would run the file's pickled code), or '' where that says nothing useful."""
    try:
        with path.open("rb") as stream:
            head = stream.read(HEAD_BYTES)
    except OSError as error:
        return f"it cannot be read: {error.strerror or one_line(error)}"
    if not head:
        return "an empty file"
    if not head.startswith(ZIP_MAGIC):  # torch.save has written zip archives since torch 1.6
        return "a text file" if is_text(head) else "not a zip archive, as torch.save writes"
    if not zipfile.is_zipfile(path):
        return "a torch file cut short, or another damaged zip archive"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        return "a torch file holding Python objects, not only tensors and plain values"
    except Exception:
        return "a zip archive torch cannot read"
    return what_state_is(state)


def what_state_is(state: object) -> str:
    """What a torch file's content is, where it is not a model file's dict."""
    if not isinstance(state, dict):
        return f"a torch file holding a {type(state).__name__}, not a model file's dict"
    if state.keys() >= TRIAL_CHECKPOINT_KEYS:
        return "a trial's checkpoint, not the study's best_model.pt"
    if state and all(isinstance(value, torch.Tensor) for value in state.values()):
        return "a plain state dict: weights without the spec and classes to rebuild the model"
    missing = [key for key in MODEL_FILE_KEYS if key not in state]
    if missing:
        return f"a torch file without {', '.join(missing)}"
    return ensemble_problem(state) or "a model file whose spec, hyperparameters or classes do not read back"


def ensemble_problem(state: dict) -> str:
    """What is wrong with a model file's members or flips (final.py --ensemble, --tta), or ''."""
    members = state.get("more_members", [])
    for number, member in enumerate(members if isinstance(members, list) else [], start=2):
        lacking = [key for key in MEMBER_KEYS if not isinstance(member, dict) or key not in member]
        if lacking:
            return f"an ensemble whose member {number} has no {', '.join(lacking)}"
    try:
        ModelFile.from_saved(state)
    except ValueError as error:  # ModelFile's own checks: unknown flips, members that do not score alike
        return one_line(error)
    except Exception:  # a spec, hyperparameters or classes that do not read back: the caller's words say it
        pass
    return ""


def is_text(head: bytes) -> bool:
    """Whether a file's first bytes read as UTF-8 text (a character cut at their end is no matter)."""
    text = head.decode("utf-8", errors="replace").rstrip("\ufffd")
    return "\ufffd" not in text and all(char.isprintable() or char in "\t\r\n" for char in text)


def as_input(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """(N, H, W, 3) uint8 → (N, 3, H, W) float32 in [0, 1] on the device: what every model takes."""
    batch = torch.from_numpy(images).to(device, non_blocking=True)
    return batch.permute(0, 3, 1, 2).float().div_(255)


def calibrated_probabilities(model: LoadedModel, images: np.ndarray) -> np.ndarray:
    """(N, C) class probabilities, float64 on the CPU: of every member and flip, averaged."""
    with torch.inference_mode():
        logits = model.scoring.view_logits(as_input(images, model.device))
    stacked = [[view.cpu().numpy() for view in views] for views in logits]
    return averaged_probabilities(stacked, model.scoring.temperatures, model.scoring.ensemble_temperature)


def calibrated(logits: torch.Tensor, temperature: float) -> np.ndarray:
    """softmax(logits / temperature) of one network's logits of the images alone, float64 on the CPU."""
    return averaged_probabilities(logits.detach().cpu().numpy()[None, None], [temperature])


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
