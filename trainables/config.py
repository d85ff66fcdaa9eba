"""The hyperparameters, each in one home, and the names (metrics, models, data) used everywhere.

A hyperparameter is one field of `Hyperparameters`: its default, and in its `Knob` its
bounds or choices, the models it applies to and whether it shapes the model. The
search-space loader, the final retrain's checks, the GPU probe's "largest
configuration" and the model spec all read it from here, so adding a knob means one
field here plus the space YAMLs (and, for a knob that shapes the model, the model
code that uses it).

Standard library only: the search checks a study against it before torch loads.
"""

from __future__ import annotations

import math
import numbers
import operator
from dataclasses import asdict, dataclass, field, fields
from typing import Any, TypeVar

# One spelling for every metric: Tune's `metric=`, checkpoint scoring, MLflow keys.
METRIC_MODES = {
    "val_acc": "max",
    "val_loss": "min",
    "val_balanced_acc": "max",
    "val_macro_f1": "max",
}
METRICS = tuple(METRIC_MODES)


@dataclass(frozen=True)
class Cost:
    """What a multi-objective study trades its metric against (--objective accuracy,<name>); always minimised."""

    metric: str
    """What each trial reports with every result, and its MLflow metric."""
    unit: str
    meaning: str
    cuda_only: bool = False
    """Measured on CUDA alone: the CPU has no honest per-trial equivalent."""


COSTS = {
    "params": Cost("params_m", "M", "parameters"),
    "latency": Cost("latency_ms", "ms", "inference latency per image on the trial's device"),
    "memory": Cost("peak_memory_mb", "MB", "peak training memory on CUDA", cuda_only=True),
}
COST_METRICS = tuple(cost.metric for cost in COSTS.values())
ACCURACY = "accuracy"
"""The objective of every study: the study's --metric (val_acc by default)."""
OBJECTIVES = (ACCURACY, *(f"{ACCURACY},{name}" for name in COSTS))
"""--objective's values: the metric alone, or the metric against one cost."""


def objective_cost(objective: str) -> str | None:
    """The cost an --objective trades accuracy against ('latency' for 'accuracy,latency'), None for 'accuracy'."""
    return objective.partition(",")[2] or None


MODEL_NAMES = ("cnn", "vit", "hybrid")
SYNTHETIC = "synthetic"
"""The built-in data source ('synthetic', or 'synthetic:C' for C classes; trainables.data makes it)."""
VIT_FULL_DEPTH = 12
"""Blocks of timm's vit_tiny_patch16_224."""
FUSIONS = ("single_token", "two_tokens")
"""The hybrid head: the seed's (fused features as a single token) or two tokens that attend to each other."""
CLASS_WEIGHTINGS = ("none", "inverse", "effective")
"""The cross-entropy's class weights, from the training split's count of each class (trainables.engine.class_weights):
none (the seed's plain loss), inverse frequency, or the effective number of samples (Cui et al., CVPR 2019)."""
RENAMED_VALUES = {"fusion": {"seed": "single_token", "tokens": "two_tokens"}}
"""Old value -> new name. Checkpoints and configs that use an old name still load; a search space is told to rename."""

T = TypeVar("T")


@dataclass(frozen=True)
class Knob:
    """What a hyperparameter may be, beyond its type and default."""

    low: float | None = None
    """Lowest value accepted (None: unbounded)."""
    high: float | None = None
    """Highest value accepted (None: unbounded)."""
    choices: tuple[str, ...] = ()
    """The values a text knob takes."""
    models: tuple[str, ...] = MODEL_NAMES
    """The models it means something for; for the others it keeps its default."""
    shapes_model: bool = False
    """Part of the architecture (a ModelSpec field), not only of the training."""
    memory_grows: bool = False
    """Larger values need more GPU memory: the probe measures the largest the space allows."""
    augments: bool = False
    """One of augment_batch's keyword arguments (trainables.augment); 0 turns that augmentation off."""


def knob(default: T, **limits: Any) -> T:
    return field(default=default, metadata={"knob": Knob(**limits)})


@dataclass(frozen=True)
class Hyperparameters:
    """What the search may tune. Tune's config dict becomes this once, at the top of a trial."""

    lr: float = knob(3e-4, low=1e-12)
    """AdamW learning rate."""
    weight_decay: float = knob(0.05, low=0.0)
    """AdamW weight decay."""
    batch_size: int = knob(32, low=2, memory_grows=True)
    """Images per step (the seed's 32 fits 8 GB at 224 px with AMP)."""
    label_smoothing: float = knob(0.0, low=0.0, high=0.99)
    """Cross-entropy label smoothing."""
    class_weighting: str = knob("none", choices=CLASS_WEIGHTINGS)
    """Weights of the classes in the training loss (CLASS_WEIGHTINGS): 'none' as the seed, every image alike;
    'inverse' and 'effective' make a rare class count more, for a training split with a class far smaller than
    another. The validation loss stays unweighted, so that trials compare on one scale."""
    hflip: float = knob(0.5, low=0.0, high=1.0, augments=True)
    """Probability of mirroring an image left-right. 0.5 as in the seed: most classes look the same mirrored.
    Set 0 where the side carries the label: chest X-rays (laterality), text, digits."""
    vflip: float = knob(0.0, low=0.0, high=1.0, augments=True)
    """Probability of turning an image upside-down. 0, unlike the seed's 0.5: an upside-down photo, X-ray or digit
    is an image no test set holds, so the flip is label noise; raise it where orientation is arbitrary
    (histopathology patches, dermoscopy)."""
    rotation_deg: float = knob(15.0, low=0.0, high=180.0, augments=True)
    """Largest rotation either way, in degrees, drawn per image. 15 as the seed's augmentation at half strength:
    a tilt a real acquisition shows, not a turn that changes what the image says."""
    color_jitter: float = knob(0.2, low=0.0, high=1.0, augments=True)
    """Brightness, contrast and saturation each scaled per image by a factor in [1 - j, 1 + j]. 0.2 as the seed's
    augmentation at half strength."""
    noise_std: float = knob(0.025, low=0.0, high=1.0, augments=True)
    """Largest σ of the Gaussian noise added to the pixels (in [0, 1]); each image draws its σ in [0, noise_std].
    0.025 as the seed's augmentation at half strength."""
    dropout: float = knob(0.2, low=0.0, high=0.99, shapes_model=True)
    """cnn: the head's dropout (the seed's 0.2); vit and hybrid: dropout on the pooled backbone features,
    so that their seed heads stay exactly as written."""
    drop_path_rate: float = knob(0.0, low=0.0, high=0.99, shapes_model=True)
    """Stochastic depth in the backbones."""
    vit_depth: int = knob(
        VIT_FULL_DEPTH, low=1, high=VIT_FULL_DEPTH, models=("vit", "hybrid"), shapes_model=True, memory_grows=True
    )
    """vit and hybrid: ViT blocks kept (the first N of the pretrained 12)."""
    fusion: str = knob("single_token", choices=FUSIONS, models=("hybrid",), shapes_model=True)
    """hybrid: 'single_token' (the seed's head as written: attention over one fused vector) or
    'two_tokens' (the CNN and ViT features as two tokens that attend to each other)."""
    plateau_factor: float = knob(0.5, low=1e-6, high=0.999)
    """ReduceLROnPlateau: the factor the learning rate is multiplied by."""
    plateau_patience: int = knob(1, low=0)
    """ReduceLROnPlateau: epochs without improvement before the learning rate drops."""
    early_stop_patience: int = knob(4, low=1)
    """Epochs without improvement before a trial stops itself."""

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls, config: dict) -> Hyperparameters:
        """Typed values from a dict (Tune's config, a YAML file); unknown names are refused, old value names
        renamed, and an old record's aug_strength replaced by the knobs it stood for. A ValueError lists every
        value that is not of its knob's type (typed says what passes)."""
        values, problems = cls.typed_values(config)
        if problems:
            raise ValueError("; ".join(problems))
        return cls(**values)

    @classmethod
    def typed_values(cls, config: dict) -> tuple[dict[str, Any], list[str]]:
        """The values of config that are of their knob's type, typed; and a problem for each of the others.
        Bounds are not checked here (value_problem does): a record keeps loading when a bound moves."""
        config = without_aug_strength(config)
        unknown = sorted(map(str, set(config) - set(cls.names())))
        if unknown:
            raise ValueError(f"unknown hyperparameter(s) {', '.join(unknown)}; valid: {', '.join(cls.names())}")
        types = {f.name: type(f.default) for f in fields(cls)}
        values, problems = {}, []
        for name, value in config.items():
            try:
                values[name] = typed(name, renamed(name, value), types[name])
            except ValueError as error:
                problems.append(str(error))
        return values, problems

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def model_knobs(self) -> dict[str, Any]:
        """The values that shape the model: the ModelSpec fields of the same names."""
        return {name: getattr(self, name) for name in SHAPES_MODEL}

    def augmentation(self) -> dict[str, float]:
        """The augmentation knobs: augment_batch's keyword arguments of the same names."""
        return {name: getattr(self, name) for name in AUGMENTS}


FLAG_HELP = "help"
"""A SpeedOptions field's metadata key: its --flag's help text."""


@dataclass(frozen=True)
class SpeedOptions:
    """CUDA speed features (the CPU ignores them).

    A new option is a field here, with its default and its --flag's help in FLAG_HELP: run.py and compare.py
    make it a --flag / --no-flag pair, new_config records it in study.yaml, and the trials' Learner gets it
    (`SpeedOptions.of(config)`). study.yaml's record needs the StudyConfig field of the same name, type and
    default: tests/test_speed_flags.py asks for it by name.
    """

    amp: bool = field(default=True, metadata={FLAG_HELP: "fp16 autocast with GradScaler"})
    """fp16 autocast with GradScaler: Turing has fp16 tensor cores but no bf16."""
    channels_last: bool = field(default=True, metadata={FLAG_HELP: "NHWC memory layout"})
    """NHWC memory layout, which tensor-core convolutions prefer."""
    cudnn_benchmark: bool = field(default=True, metadata={FLAG_HELP: "autotune convolutions once"})
    """Autotune convolution algorithms once for the fixed input shape."""
    compile: bool = field(
        default=False,
        metadata={FLAG_HELP: "torch.compile each trial's model (its compile time is paid again in every trial)"},
    )
    """torch.compile the model: faster steps, but every trial pays the compile time again."""

    @classmethod
    def of(cls, settings: object) -> SpeedOptions:
        """The options that `settings` (a StudyConfig, run.py's parsed arguments) holds under the same names."""
        return cls(**{option.name: getattr(settings, option.name) for option in fields(cls)})


SEED = "seed"
"""The one key of a trial's config that is no hyperparameter: its own seed, where it is not the study's
(a confirmation retrains a configuration with other seeds)."""

KNOBS: dict[str, Knob] = {f.name: f.metadata["knob"] for f in fields(Hyperparameters)}
DEFAULTS = Hyperparameters()
SHAPES_MODEL = tuple(name for name, limits in KNOBS.items() if limits.shapes_model)
MEMORY_GROWS = tuple(name for name, limits in KNOBS.items() if limits.memory_grows)
AUGMENTS = tuple(name for name, limits in KNOBS.items() if limits.augments)

AUG_STRENGTH = "aug_strength"
"""The retired single augmentation knob: one strength s in [0, 1] that scaled rotation, colour jitter and noise
together and, at any s above 0, flipped every image both ways with p = 0.5. Checkpoints, best_config.yaml and model
files of earlier studies hold it; from_dict translates it (from_aug_strength), a search space is told to list
the knobs that replaced it (retired_knob_problem)."""


def from_aug_strength(strength: float) -> dict[str, float]:
    """The augmentation knobs that apply what aug_strength = strength applied, so an old config trains as it did."""
    if not 0 <= strength <= 1:
        raise ValueError(f"{AUG_STRENGTH}={strength} is outside [0, 1]")
    flip = 0.5 if strength > 0 else 0.0
    return {
        "hflip": flip,
        "vflip": flip,
        "rotation_deg": 30.0 * strength,
        "color_jitter": 0.4 * strength,
        "noise_std": 0.05 * strength,
    }


def without_aug_strength(config: dict) -> dict:
    """config with an old record's aug_strength replaced by the knobs it stood for; config itself if it has none."""
    if AUG_STRENGTH not in config:
        return config
    both = sorted(set(config) & set(AUGMENTS))
    if both:
        raise ValueError(f"{AUG_STRENGTH} (retired) and {', '.join(both)} both given: keep the new knobs alone")
    kept = {name: value for name, value in config.items() if name != AUG_STRENGTH}
    return {**kept, **from_aug_strength(typed(AUG_STRENGTH, config[AUG_STRENGTH], float))}


def retired_knob_problem(name: str) -> str | None:
    """Why a search space may no longer name `name`, or None where it is no retired knob."""
    if name != AUG_STRENGTH:
        return None
    return (
        f"{name} is retired: search or fix one knob per augmentation instead, {', '.join(AUGMENTS)} "
        f"(e.g. vflip: {{type: fixed, value: 0}}; see docs/search-spaces.md)"
    )


def improves(mode: str, score: float | None, best: float | None) -> bool:
    """Whether `score` is a number that beats `best` (None, or a NaN kept by an older checkpoint: nothing yet) in
    `mode` ('max' or 'min')."""
    if score is None or math.isnan(score):
        return False
    return best is None or math.isnan(best) or (score > best if mode == "max" else score < best)


def keep_best(bests: dict[str, float], key: str, score: float | None, mode: str) -> bool:
    """The best score so far: keep `score` as `key`'s best in `bests` where it improves on it (a NaN or None never
    does); True where it did. The searcher, the MLflow record and the console keep each trial's best this way."""
    if score is None or not improves(mode, score, bests.get(key)):
        return False
    bests[key] = float(score)
    return True


def knobs_of(model: str, values: dict[str, Any]) -> dict[str, Any]:
    """The values of the knobs that mean something for `model` (vit_depth is no cnn's), in their order."""
    return {name: value for name, value in values.items() if name not in KNOBS or model in KNOBS[name].models}


def renamed(name: str, value: object) -> object:
    return RENAMED_VALUES.get(name, {}).get(value, value) if isinstance(value, str) else value


def typed(name: str, value: object, kind: type) -> Any:
    """value as the field's type, never rounded: an int knob takes an integer, or a float with an integer's
    value (16.0, as YAML or JSON may write it: 16), and refuses 16.7 as the search-space loader does; a float
    knob takes any finite number; neither takes a bool (True is no batch size) nor text other than a number's
    ('1e-5', which YAML 1.1 leaves as text). A text knob takes its value as text."""
    if kind is str:
        return str(value)
    number = plain_number(value)
    if number is None:
        raise ValueError(f"{name}={value!r} is not a{'n integer' if kind is int else ' number'}")
    if not finite(number):
        raise ValueError(f"{name}={value!r} is not a finite number")
    if kind is int:
        if number != int(number):
            raise ValueError(f"{name}={value!r} is not an integer")
        return int(number)
    return float(number)


def plain_number(value: object) -> int | float | None:
    """value as a Python int or float (numpy's scalars and a number's text too); None for anything else,
    a bool among them."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    if isinstance(value, numbers.Integral):
        return operator.index(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return None


def value_problem(name: str, value: object) -> str | None:
    """Why `value` cannot be hyperparameter `name` (its type, bounds or choices), or None if it can."""
    kind = type(getattr(DEFAULTS, name))
    limits = KNOBS[name]
    if kind is str:
        if value in limits.choices:
            return None
        new_names = RENAMED_VALUES.get(name, {})
        if isinstance(value, str) and value in new_names:
            return f"{name}: {value!r} is now called {new_names[value]!r}: rename it"
        return f"{name}: {value!r} is not one of {', '.join(limits.choices)}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"{name}: {value!r} is not a{'n integer' if kind is int else ' number'}"
    if not finite(value):
        return f"{name}: {value!r} is not a finite number"
    if kind is int and value != int(value):
        return f"{name}: {value!r} is not an integer"
    if (limits.low is not None and value < limits.low) or (limits.high is not None and value > limits.high):
        return f"{name}: {value} is outside [{limits.low}, {'inf' if limits.high is None else limits.high}]"
    return None


def finite(value: float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer too large for a float
        return False


def is_synthetic(source: str) -> bool:
    return source == SYNTHETIC or source.startswith(SYNTHETIC + ":")


MIN_WINDOW_WIDTH = 1.0
"""DICOM's linear window (PS3.3 C.11.2.1.2.1) is defined for a width of at least 1."""


def window_problem(window: tuple[float, float]) -> str | None:
    """Why (center, width) is no DICOM window (run.py --window, trainables.dicom), or None: here, beside the other
    checks of plain values, so that the study's record checks it before anything loads."""
    center, width = window
    if not (finite(center) and finite(width)):
        return "the center and width must be finite numbers"
    if width < MIN_WINDOW_WIDTH:
        return f"the width must be at least {MIN_WINDOW_WIDTH:g} (DICOM's linear window)"
    return None
