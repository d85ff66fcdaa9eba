"""The winner: the configuration a study found best, one typed record from the study to the registry.

A study makes it from its best trial (`Winner.from_trial`) and writes it as its
best_config.yaml (`to_yaml`) beside its Ray folder and on its parent run; final.py reads
it back with `Winner.from_dict` (or `load_file` for --config), whether it comes from
that run, from a file, or is rebuilt for one trial (--run-id) from the study's
study.yaml and the trial's own hyperparameters. The retrain writes the same record
next to its results as config.yaml (repeat it with --config); so does compare.py's
reference model, whose record names its timm backbone.

Standard library, PyYAML and trainables' plain-data modules only: a wrong file is
refused before MLflow or torch load.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from search.records.split import SplitSpec
from search.records.study_config import StudyConfig
from trainables.config import (
    DEFAULTS,
    KNOBS,
    METRIC_MODES,
    MODEL_NAMES,
    SHAPES_MODEL,
    Hyperparameters,
    renamed,
    value_problem,
    window_problem,
)
from trainables.spec import REFERENCE, ModelSpec

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
    "backbone",
    "subgroups",
    "window",
)
SPEC_KEYS = tuple(f.name for f in fields(ModelSpec))


class WinnerRefused(ValueError):
    """A best_config.yaml (or config.yaml) that is no winner's record: every problem, on one line."""


@dataclass(frozen=True, kw_only=True)
class Winner:
    """What the retrain needs to know about the configuration it repeats, and where it came from."""

    model: str
    """cnn, vit or hybrid; or 'reference' (compare.py's larger model, named by `backbone`)."""
    hyperparameters: Hyperparameters
    classes: list[str]
    """The study's class names, in label order: the data must have exactly these."""
    split: SplitSpec
    """The study's data, seed and smoke subsample: its train/val/test split."""
    img_size: int
    window: tuple[float, float] | None = None
    """The (center, width) the study windowed its DICOM images with (run.py --window): the retrain decodes them
    the same way, and its model file keeps it for predict.py. None: each file's own; written only where set."""
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
    model_spec: ModelSpec | None = None
    """The architecture the trial's checkpoint holds; None where the record was rebuilt without one."""
    backbone: str = ""
    """A reference model's timm name (compare.py --reference); empty for cnn, vit and hybrid."""
    subgroups: tuple[str, ...] = ()
    """The study's subgroup columns (run.py --subgroups): its manifest is read with them, and the retrain reports
    its test results per value of each. Written only where the study declared some."""
    # ---- where it was read from: for messages and the final run's tags, not part of the file
    source: str = ""
    """'study NAME', 'trial run ID', 'config FILE', 'reference model NAME'."""
    experiment_id: str | None = None
    """The study's MLflow experiment, when it came from MLflow."""
    run_id: str | None = None
    """The MLflow run it came from (the study's parent run, or the trial's run)."""

    @property
    def trial_name(self) -> str | None:
        """The trial as a person knows it: t07; Ray's id, said to be one, from a best_config.yaml without the
        name; None for a configuration of no trial."""
        if self.trial:
            return self.trial
        return f"{self.trial_id} (Ray's trial id)" if self.trial_id else None

    @property
    def trial_or_id(self) -> str:
        """The trial's name (t07), else Ray's id of it: what the study's run is tagged with."""
        return self.trial or self.trial_id or ""

    @classmethod
    def from_trial(
        cls,
        study: StudyConfig,
        *,
        trial_id: str | None,
        metrics: dict,
        hyperparameters: dict,
        classes: list[str],
        model_spec: dict | None = None,
        trial: str | None = None,
        requested_model: str | None = None,
        **where: Any,
    ) -> Winner:
        """The best trial's configuration and its best epoch's metrics (`metrics[study.metric]` and
        `metrics['epoch']`), with the study settings a retrain repeats and the trial's model spec where its
        checkpoint gives one; checked as a file is. `trial` is the trial's name (t07), `trial_id` Ray's id of it;
        `requested_model` and `where` (source, experiment_id, run_id; default source: the study) as from_dict's."""
        record: dict[str, Any] = {
            "study": study.name,
            "trial": trial,
            "trial_id": trial_id,
            "metric": study.metric,
            "best_value": float(metrics[study.metric]),
            "best_epoch": int(metrics["epoch"]),
            "hyperparameters": hyperparameters,
            "classes": list(classes),
            "model": study.model,
            "epochs": study.epochs,
            "img_size": study.img_size,
            "seed": study.seed,
            "data": study.data,
            "smoke": study.smoke,
            "pretrained": study.pretrained,
        }
        if study.subgroups:
            record["subgroups"] = list(study.subgroups)
        if study.window is not None:
            record["window"] = list(study.window)
        if model_spec is not None:
            record["model_spec"] = model_spec
        return cls.from_dict(record, where.pop("source", f"study {study.name}"), requested_model, **where)

    def to_dict(self) -> dict[str, Any]:
        """best_config.yaml's content, in its order (the file a study writes and final.py reads back)."""
        record: dict[str, Any] = {
            "study": self.study,
            "trial": self.trial,
            "trial_id": self.trial_id,
            "metric": self.metric,
            "best_value": self.best_value,
            "best_epoch": self.best_epoch,
            "hyperparameters": self.hyperparameters.to_dict(),
            "classes": list(self.classes),
            "model": self.model,
        }
        if self.backbone:  # a reference model's timm name: the record repeats that model, not a searched one
            record["backbone"] = self.backbone
        record |= {
            "epochs": self.epochs,
            "img_size": self.img_size,
            "seed": self.split.seed,
            "data": self.split.data,
            "smoke": self.split.smoke,
            "pretrained": self.pretrained,
        }
        if self.subgroups:  # a study without them writes the file as before
            record["subgroups"] = list(self.subgroups)
        if self.window is not None:  # likewise
            record["window"] = list(self.window)
        if self.model_spec is not None:
            record["model_spec"] = self.model_spec.portable()
        return record

    def to_yaml(self) -> str:
        """The record as best_config.yaml (and a retrain's config.yaml) holds it."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, raw: object, source: str, requested_model: str | None = None, **where: Any) -> Winner:
        """A best_config.yaml mapping, checked; WinnerRefused lists every problem. `requested_model`: refuse a
        config for another model (final.py --model); `where`: experiment_id and run_id it was read from."""
        if not isinstance(raw, dict):
            raise WinnerRefused(f"{source} is not a best_config.yaml mapping (model, hyperparameters, classes, ...)")
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
            raise WinnerRefused(f"{source}: " + "; ".join(problems))

        model = str(raw["model"])
        backbone = parse_backbone(model, raw.get("backbone"), problems)
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
        subgroups = parse_subgroups(raw.get("subgroups"), problems)
        window = parse_window(raw.get("window"), problems)
        spec = raw.get("model_spec")
        if spec is not None:
            # Compared with what parsed only: a field already refused is one problem, not one more per comparison.
            stated = {
                "name": model if known_model or backbone else None,
                "num_classes": None if classes is None else len(classes),
                "img_size": raw["img_size"] if is_integer(raw["img_size"]) else None,
            }
            check_model_spec(spec, stated, hp, problems)
        if problems or hp is None or classes is None:
            raise WinnerRefused(f"{source}: " + "; ".join(problems))
        return cls(
            model=model,
            hyperparameters=hp,
            classes=list(classes),
            split=SplitSpec(data=str(raw["data"]), seed=raw["seed"], smoke=bool(raw.get("smoke", False))),
            img_size=raw["img_size"],
            window=window,
            pretrained=bool(raw.get("pretrained", True)),
            metric=metric,
            best_value=None if best_value is None else float(best_value),
            best_epoch=raw.get("best_epoch"),
            epochs=raw.get("epochs"),
            study=raw.get("study"),
            trial=trial,
            trial_id=raw.get("trial_id"),
            model_spec=None if spec is None else portable_spec(spec, model, len(classes), raw["img_size"]),
            backbone=backbone,
            subgroups=subgroups,
            source=source,
            **where,
        )


# ---------------------------------------------------------------- the checks


def parse_backbone(model: str, backbone: object, problems: list[str]) -> str:
    """A reference model's timm name; '' for cnn, vit and hybrid, whose backbones are fixed."""
    if model == REFERENCE:
        if not isinstance(backbone, str) or not backbone.strip():
            problems.append("a reference model's config needs its timm name (backbone), e.g. convnext_tiny")
            return ""
        return backbone
    if model not in MODEL_NAMES:
        problems.append(f"model {model!r} is not one of {', '.join(MODEL_NAMES)}")
    if backbone not in (None, ""):
        problems.append(f"backbone {backbone!r} names a reference model's timm model, not one of a {model}")
    return ""


def parse_trial_name(value: object, problems: list[str]) -> str | None:
    """The trial's name (t07), optional: a best_config.yaml written before it was recorded has none."""
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        problems.append(f"trial must be a trial's name as its study printed it, e.g. t07, not {value!r}")
        return None
    return value


def parse_subgroups(value: object, problems: list[str]) -> tuple[str, ...]:
    """The study's subgroup columns, optional: a list of column names."""
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(column, str) and column for column in value):
        problems.append(f"subgroups must be a list of manifest column names, e.g. [site, sex], not {value!r}")
        return ()
    return tuple(value)


def parse_window(value: object, problems: list[str]) -> tuple[float, float] | None:
    """The study's DICOM window, optional: [center, width], a window as run.py --window checks it."""
    if value is None:
        return None
    if not isinstance(value, list) or len(value) != 2 or not all(is_number(v) for v in value):
        problems.append(f"window must be [center, width], two numbers such as [40, 400], not {value!r}")
        return None
    window = (float(value[0]), float(value[1]))
    problem = window_problem(window)
    if problem:
        problems.append(f"window {value!r}: {problem}")
        return None
    return window


def is_number(value: object) -> bool:
    """An int or a float, and not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_integer(value: object) -> bool:
    """An int, and not a bool (YAML's true is no seed)."""
    return isinstance(value, int) and not isinstance(value, bool)


def parse_hyperparameters(values: object, model: str | None, problems: list[str]) -> Hyperparameters | None:
    """Typed (an int knob takes no 16.7), in range (the bounds a search space may use), and meaningful for
    this model (None: a model already refused, or a reference, whose knobs are not checked against it). One
    problem per bad value, every one of them; None where any."""
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


def portable_spec(spec: dict, model: str, num_classes: int, img_size: int) -> ModelSpec:
    """A checked model_spec mapping as the ModelSpec it describes (a key it leaves out: the config's own)."""
    return ModelSpec.from_portable({"name": model, "num_classes": num_classes, "img_size": img_size, **spec})


def same(a: object, b: object) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def load_file(path: str, requested_model: str | None = None) -> Winner:
    """A best_config.yaml (or a retrain's config.yaml) given as --config: read without MLflow."""
    file = Path(path)
    if not file.is_file():
        raise WinnerRefused(
            f"config file {path} does not exist: pass the best_config.yaml a study wrote (ray_results/<study>/best/)"
        )
    try:
        raw = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError, OSError):
        raise WinnerRefused(f"config file {path} is not valid YAML: pass the best_config.yaml a study wrote") from None
    return Winner.from_dict(raw, f"config {path}", requested_model)
