"""The winner's configuration (best_config.yaml): one writer, one reader, checked before anything runs.

A study writes its winner with `winner_record` (from its StudyConfig and the best
trial's checkpoint) beside its Ray folder and on its parent run; final.py reads it with
`parse_config`, whether it comes from that run, from a file (--config), or is rebuilt
for one trial (--run-id) from the study's study.yaml and the trial's own
hyperparameters. The retrain writes the same file next to its results (repeat it with
--config).

Standard library, PyYAML and trainables' plain-data modules only: a wrong file is
refused before MLflow or torch load.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from search.errors import UsageError
from search.study.config import StudyConfig
from trainables.config import (
    DEFAULTS,
    KNOBS,
    METRIC_MODES,
    MODEL_NAMES,
    SHAPES_MODEL,
    Hyperparameters,
    renamed,
    value_problem,
)
from trainables.spec import ModelSpec

REQUIRED_KEYS = ("model", "hyperparameters", "classes", "data", "seed", "img_size")
OPTIONAL_KEYS = (
    "study",
    "trial",
    "trial_id",
    "metric",
    "best_value",
    "best_epoch",
    "model_spec",
    "epochs",
    "smoke",
    "pretrained",
)
SPEC_KEYS = tuple(f.name for f in fields(ModelSpec))


@dataclass(frozen=True)
class WinnerConfig:
    """What the retrain needs to know about the configuration it repeats."""

    model: str
    """cnn, vit or hybrid."""
    hyperparameters: Hyperparameters
    classes: list[str]
    """The study's class names, in label order: the data must have exactly these."""
    data: str
    """The study's data source ('synthetic' or an absolute folder)."""
    seed: int
    """The study's seed: it decides the train/val/test split."""
    img_size: int
    smoke: bool = False
    """A --smoke study: the same per-class subsample is applied, so the split is identical."""
    pretrained: bool = True
    """The study started from pretrained backbones."""
    metric: str = "val_acc"
    best_value: float | None = None
    """The search's best validation score (of `metric`)."""
    best_epoch: int | None = None
    """The epoch at which the winner scored it: the retrain's default budget."""
    epochs: int | None = None
    """The study's epoch budget per trial."""
    study: str | None = None
    trial: str | None = None
    """The trial's name as its study printed it (t07; a confirmed winner's search trial); None in a
    best_config.yaml written before the name was recorded."""
    trial_id: str | None = None
    """Ray's id of the trial whose checkpoint this is: for the record, not for people (see `trial_name`)."""
    source: str = ""
    """Where it came from, for messages: 'study NAME', 'trial run ID', 'config FILE'."""
    backbone: str = ""
    """A reference model's timm name (compare.py --reference); empty for cnn, vit and hybrid."""
    experiment_id: str | None = None
    """The study's MLflow experiment, when it came from MLflow."""
    run_id: str | None = None
    """The MLflow run it came from (the study's parent run, or the trial's run)."""
    raw: dict = field(default_factory=dict, repr=False)
    """The config in best_config.yaml form, written beside the results."""

    @property
    def trial_name(self) -> str | None:
        """The trial as a person knows it: t07; Ray's id, said to be one, from a best_config.yaml without the
        name; None for a configuration of no trial."""
        if self.trial:
            return self.trial
        return f"{self.trial_id} (Ray's trial id)" if self.trial_id else None


def winner_record(
    config: StudyConfig,
    trial_id: str | None,
    metrics: dict,
    hyperparameters: dict,
    classes: list[str],
    model_spec: dict | None = None,
    trial: str | None = None,
) -> dict:
    """best_config.yaml's content: the best trial's configuration and its best epoch's metrics, with the
    study settings a retrain repeats (and the trial's model spec, where its checkpoint gives one).
    `trial` is the trial's name (t07), `trial_id` Ray's id of it."""
    record = {
        "study": config.name,
        "trial": trial,
        "trial_id": trial_id,
        "metric": config.metric,
        "best_value": float(metrics[config.metric]),
        "best_epoch": int(metrics["epoch"]),
        "hyperparameters": hyperparameters,
        "classes": list(classes),
        "model": config.model,
        "epochs": config.epochs,
        "img_size": config.img_size,
        "seed": config.seed,
        "data": config.data,
        "smoke": config.smoke,
        "pretrained": config.pretrained,
    }
    return record if model_spec is None else {**record, "model_spec": model_spec}


# ---------------------------------------------------------------- the file form


def parse_config(raw: object, source: str, requested_model: str | None = None, **where) -> WinnerConfig:
    """Validate a best_config.yaml mapping; raise one UsageError listing every problem."""
    if not isinstance(raw, dict):
        raise UsageError(f"{source} is not a best_config.yaml mapping (model, hyperparameters, classes, ...)")
    problems: list[str] = []
    model = raw.get("model")
    if requested_model and model and requested_model != model:
        problems.append(f"it is a config for --model {model}, not --model {requested_model}")
    unknown = sorted(set(raw) - set(REQUIRED_KEYS) - set(OPTIONAL_KEYS))
    if unknown:
        problems.append(
            f"unknown key(s) {', '.join(map(str, unknown))}; valid: {', '.join(REQUIRED_KEYS + OPTIONAL_KEYS)}"
        )
    missing = [key for key in REQUIRED_KEYS if raw.get(key) is None]
    if missing:
        problems.append(f"missing {', '.join(missing)}")
        raise UsageError(f"{source}: " + "; ".join(problems))

    model = str(raw["model"])
    if model not in MODEL_NAMES:
        problems.append(f"model {model!r} is not one of {', '.join(MODEL_NAMES)}")
    known_model = model if model in MODEL_NAMES else None
    hp = parse_hyperparameters(raw["hyperparameters"], known_model, problems)
    classes = raw["classes"]
    if not isinstance(classes, list) or len(classes) < 2 or not all(isinstance(c, str) for c in classes):
        problems.append("classes must be a list of at least 2 class names")
        classes = None
    for key in ("seed", "img_size"):
        if not is_integer(raw[key]):
            problems.append(f"{key} must be an integer, not {raw[key]!r}")
    metric = raw.get("metric") or "val_acc"
    if metric not in METRIC_MODES:
        problems.append(f"metric {metric!r} is not one of {', '.join(METRIC_MODES)}")
    for key in ("best_epoch", "epochs"):
        value = raw.get(key)
        if value is not None and (not is_integer(value) or value < 1):
            problems.append(f"{key} must be a positive integer, not {value!r}")
    best_value = raw.get("best_value")
    if best_value is not None and not (
        isinstance(best_value, (int, float)) and not isinstance(best_value, bool) and math.isfinite(best_value)
    ):
        problems.append(f"best_value must be a finite number, not {best_value!r}")
    trial = parse_trial_name(raw.get("trial"), problems)
    if raw.get("model_spec") is not None:
        # Compared with what parsed only: a field already refused is one problem, not one more per comparison.
        stated = {
            "name": known_model,
            "num_classes": None if classes is None else len(classes),
            "img_size": raw["img_size"] if is_integer(raw["img_size"]) else None,
        }
        check_model_spec(raw["model_spec"], stated, hp, problems)
    if problems or hp is None or classes is None:
        raise UsageError(f"{source}: " + "; ".join(problems))
    return WinnerConfig(
        model=model,
        hyperparameters=hp,
        classes=list(classes),
        data=str(raw["data"]),
        seed=raw["seed"],
        img_size=raw["img_size"],
        smoke=bool(raw.get("smoke", False)),
        pretrained=bool(raw.get("pretrained", True)),
        metric=metric,
        best_value=None if best_value is None else float(best_value),
        best_epoch=raw.get("best_epoch"),
        epochs=raw.get("epochs"),
        study=raw.get("study"),
        trial=trial,
        trial_id=raw.get("trial_id"),
        source=source,
        raw={**raw, "hyperparameters": hp.to_dict()},
        **where,
    )


def parse_trial_name(value: object, problems: list[str]) -> str | None:
    """The trial's name (t07), optional: a best_config.yaml written before it was recorded has none."""
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        problems.append(f"trial must be a trial's name as its study printed it, e.g. t07, not {value!r}")
        return None
    return value


def is_integer(value: object) -> bool:
    """An int, and not a bool (YAML's true is no seed)."""
    return isinstance(value, int) and not isinstance(value, bool)


def parse_hyperparameters(values: object, model: str | None, problems: list[str]) -> Hyperparameters | None:
    """Typed (an int knob takes no 16.7), in range (the bounds a search space may use), and meaningful for
    this model (None: a model already refused, whose knobs are not checked against it). One problem per bad
    value, every one of them; None where any."""
    if not isinstance(values, dict):
        problems.append("hyperparameters must map names to values")
        return None
    try:
        typed, type_problems = Hyperparameters.typed_values(values)
    except ValueError as error:  # unknown names, or the retired aug_strength beside its knobs
        problems.append(f"hyperparameters: {error}")
        return None
    found = [f"hyperparameters: {problem}" for problem in type_problems]
    for name, value in typed.items():
        limits = KNOBS[name]
        if model is not None and model not in limits.models and value != getattr(DEFAULTS, name):
            found.append(
                f"{name}={value} applies to {' or '.join(limits.models)} only: this is not a config for a {model}"
            )
        elif problem := value_problem(name, value):
            found.append(problem)
    problems += found
    return None if found else Hyperparameters(**typed)


def check_model_spec(spec: object, stated: dict, hp: Hyperparameters | None, problems: list[str]) -> None:
    """The architecture the study trained must be the one these hyperparameters and classes describe.
    `stated` holds the config's own name, num_classes and img_size, each None where the config's value was
    refused (then not compared); hp is None where the hyperparameters were."""
    if not isinstance(spec, dict):
        problems.append("model_spec must be a mapping")
        return
    unknown = sorted(map(str, set(spec) - set(SPEC_KEYS)))
    if unknown:
        problems.append(f"model_spec: unknown key(s) {', '.join(unknown)}; valid: {', '.join(SPEC_KEYS)}")
    name, num_classes, img_size = stated["name"], stated["num_classes"], stated["img_size"]
    if name is not None and spec.get("name", name) != name:
        problems.append(f"model_spec is for model {spec['name']}, but model is {name}: this config mixes two models")
    if num_classes is not None and spec.get("num_classes", num_classes) != num_classes:
        problems.append(f"model_spec.num_classes is {spec['num_classes']} but classes lists {num_classes}")
    if img_size is not None and spec.get("img_size", img_size) != img_size:
        problems.append(f"model_spec.img_size is {spec['img_size']} but img_size is {img_size}")
    if hp is None:
        return
    for knob in SHAPES_MODEL:
        if knob in spec and not same(renamed(knob, spec[knob]), getattr(hp, knob)):
            problems.append(f"model_spec.{knob}={spec[knob]} disagrees with hyperparameters.{knob}={getattr(hp, knob)}")


def same(a: object, b: object) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def load_file(path: str, requested_model: str | None) -> WinnerConfig:
    file = Path(path)
    if not file.is_file():
        raise UsageError(
            f"config file {path} does not exist: pass the best_config.yaml a study wrote (ray_results/<study>/best/)"
        )
    try:
        raw = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError, OSError):
        raise UsageError(f"config file {path} is not valid YAML: pass the best_config.yaml a study wrote") from None
    return parse_config(raw, f"config {path}", requested_model)
