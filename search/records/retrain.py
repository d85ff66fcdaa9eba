"""The retrain's records: what final.py and compare.py ask for (RetrainRequest), and what the final run records
as its params and in metrics.json (RetrainSettings)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from search.records.operating_point import OperatingTarget


@dataclass(frozen=True, kw_only=True)
class RetrainRequest:
    """How to retrain a winner: final.py's flags, resolved; compare.py fills one for its reference model."""

    tracking_uri: str
    cache_dir: str
    """The decoded-image cache (shared with run.py)."""
    data: str | None = None
    """A data source instead of the study's (its classes must be the study's)."""
    weights: tuple[tuple[str, str], ...] = ()
    """(backbone, path) pairs of local pretrained weights files."""
    no_pretrained: bool = False
    """Random initialisation, whatever the study used."""
    keep_val: bool = False
    """Train on train only, early-stop on val and calibrate on it; else train on train+val."""
    epochs: int | None = None
    """Epochs to train; None: the winner's best epoch (with keep_val: the study's budget)."""
    seed: int | None = None
    """The training seed; None: the study's (the split is the study's whatever this says)."""
    config_file: str | None = None
    """The --config file the winner was read from: its stem names a run of no study."""
    experiment: str | None = None
    """An MLflow experiment instead of the study's."""
    register_name: str | None = None
    """The registered model's name; None: <model>-classifier."""
    out: str | None = None
    """The results folder; None: final/<label>-<timestamp>."""
    export: str | None = None
    """A format to write the model in as well ('onnx'), or None."""
    positive: str | None = None
    """The class whose sensitivity and specificity are reported (--positive CLASS), or None."""
    operating_point: OperatingTarget | None = None
    """--operating-point: the sensitivity or specificity the threshold on the positive class must reach on val."""
    external: str | None = None
    """Another site's images of the same classes (--external DATA), tested whole after the retrain, or None."""


@dataclass(frozen=True, kw_only=True)
class RetrainSettings:
    """What the final run records as params and in metrics.json: enough to repeat it. The field order is the
    params' and the file's."""

    model: str
    source: str
    """Where the winner came from: 'study NAME', 'trial run ID', 'config FILE', 'reference model NAME'."""
    study: str | None
    trial: str | None
    trial_id: str | None
    train_on: str
    """'train+val', or 'train' (early stopping on val)."""
    epochs: int
    img_size: int
    seed: int
    """The training seed."""
    split_seed: int
    """The study's seed, which cut the split."""
    split_from: str
    """'study_record' (the study's split.json) or 'seed' (cut again)."""
    data: str
    window: tuple[float, float] | None
    """The (center, width) its DICOM images were windowed with (the study's --window); None: each file's own."""
    smoke: bool
    pretrained: bool
    search_metric: str
    search_best_value: float | None
    num_classes: int
    train_images: int
    val_images: int
    test_images: int
    calibration_split: str
    """Where the temperature is fitted ('val'), or 'none': never on the test."""

    def to_dict(self) -> dict[str, Any]:
        """As params and metrics.json's "settings" hold them."""
        return asdict(self)
