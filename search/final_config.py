"""The winner's configuration: from a study, one trial, or a file, checked before anything runs.

Three sources, one shape: the best_config.yaml a study logs on its parent run
(search/launch.py `log_best`). A trial's run is turned into that shape from its
params, its study's settings and its metric history, so every source is validated
alike, and the retrain writes the same file next to its results (repeat it with
--config).

Only the standard library, PyYAML and trainables.config load at import time; MLflow
and torch load when a source needs them.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from search.errors import UsageError
from search.tracking import FINAL_ROLE, PARENT_TAG, ROLE_TAG, STATUS_TAG, STUDY_TAG, all_runs, is_study_run, mlflow_client, one_line, study_runs
from trainables.config import METRIC_MODES, Hyperparameters

REQUIRED_KEYS = ("model", "hyperparameters", "classes", "data", "seed", "img_size")
OPTIONAL_KEYS = ("study", "trial_id", "metric", "best_value", "best_epoch", "model_spec", "epochs", "smoke", "pretrained")
# ModelSpec fields that must agree with the hyperparameters of the same name.
SPEC_KNOBS = ("dropout", "drop_path_rate", "vit_depth", "fusion")
SPEC_KEYS = ("name", "num_classes", "img_size", *SPEC_KNOBS, "pretrained", "weights_files")

BEST_CONFIG = "best/best_config.yaml"


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
    trial_id: str | None = None
    source: str = ""
    """Where it came from, for messages: 'study NAME', 'trial run ID', 'config FILE'."""
    experiment_id: str | None = None
    """The study's MLflow experiment, when it came from MLflow."""
    run_id: str | None = None
    """The MLflow run it came from (the study's parent run, or the trial's run)."""
    raw: dict = field(default_factory=dict, repr=False)
    """The config in best_config.yaml form, written beside the results."""


def load_winner(args) -> WinnerConfig:
    """The configuration named on the command line: --study, --run-id or --config."""
    if args.config is not None:
        return load_file(args.config, args.model)
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import SQLAlchemyError

    try:
        if args.study is not None:
            return load_study(args.tracking_uri, args.study, args.model)
        return load_run(args.tracking_uri, args.run_id, args.model)
    except (MlflowException, SQLAlchemyError) as error:  # a server that is down, a file that is no MLflow store
        raise UsageError(f"cannot read MLflow at {args.tracking_uri}: {one_line(error)}") from None


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
        problems.append(f"unknown key(s) {', '.join(map(str, unknown))}; valid: {', '.join(REQUIRED_KEYS + OPTIONAL_KEYS)}")
    missing = [key for key in REQUIRED_KEYS if raw.get(key) is None]
    if missing:
        problems.append(f"missing {', '.join(missing)}")
        raise UsageError(f"{source}: " + "; ".join(problems))

    from trainables.spec import MODEL_NAMES

    if model not in MODEL_NAMES:
        problems.append(f"model {model!r} is not one of {', '.join(MODEL_NAMES)}")
    hp = parse_hyperparameters(raw["hyperparameters"], model, problems)
    classes = raw["classes"]
    if not isinstance(classes, list) or len(classes) < 2 or not all(isinstance(c, str) for c in classes):
        problems.append("classes must be a list of at least 2 class names")
        classes = []
    for key in ("seed", "img_size"):
        if not isinstance(raw[key], int) or isinstance(raw[key], bool):
            problems.append(f"{key} must be an integer, not {raw[key]!r}")
    metric = raw.get("metric") or "val_acc"
    if metric not in METRIC_MODES:
        problems.append(f"metric {metric!r} is not one of {', '.join(METRIC_MODES)}")
    for key in ("best_epoch", "epochs"):
        value = raw.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            problems.append(f"{key} must be a positive integer, not {value!r}")
    best_value = raw.get("best_value")
    if best_value is not None and not (isinstance(best_value, (int, float)) and not isinstance(best_value, bool)
                                       and math.isfinite(best_value)):
        problems.append(f"best_value must be a finite number, not {best_value!r}")
    if raw.get("model_spec") is not None:
        check_model_spec(raw["model_spec"], model, len(classes), raw["img_size"], hp, problems)
    if problems:
        raise UsageError(f"{source}: " + "; ".join(problems))
    return WinnerConfig(
        model=model, hyperparameters=hp, classes=list(classes), data=str(raw["data"]), seed=raw["seed"],
        img_size=raw["img_size"], smoke=bool(raw.get("smoke", False)), pretrained=bool(raw.get("pretrained", True)),
        metric=metric, best_value=None if best_value is None else float(best_value), best_epoch=raw.get("best_epoch"),
        epochs=raw.get("epochs"), study=raw.get("study"), trial_id=raw.get("trial_id"), source=source, raw=raw, **where,
    )


def parse_hyperparameters(values: object, model: str, problems: list[str]) -> Hyperparameters:
    """Typed, in range (the bounds a search space may use), and meaningful for this model."""
    from search.spaces import MODEL_ONLY, Parameter, check_domain

    if not isinstance(values, dict):
        problems.append("hyperparameters must map names to values")
        return Hyperparameters()
    try:
        hp = Hyperparameters.from_dict(values)
    except (TypeError, ValueError) as error:
        problems.append(f"hyperparameters: {error}")
        return Hyperparameters()
    for name, value in hp.to_dict().items():
        check_domain(Parameter(name, "fixed", value=value), problems)
    defaults = Hyperparameters()
    for name, models in MODEL_ONLY.items():
        if model not in models and getattr(hp, name) != getattr(defaults, name):
            problems.append(
                f"{name}={getattr(hp, name)} applies to {' or '.join(models)} only: this is not a config for a {model}"
            )
    return hp


def check_model_spec(spec: object, model: str, num_classes: int, img_size: int, hp: Hyperparameters, problems: list[str]) -> None:
    """The architecture the study trained must be the one these hyperparameters and classes describe."""
    if not isinstance(spec, dict):
        problems.append("model_spec must be a mapping")
        return
    unknown = sorted(set(spec) - set(SPEC_KEYS))
    if unknown:
        problems.append(f"model_spec: unknown key(s) {', '.join(map(str, unknown))}; valid: {', '.join(SPEC_KEYS)}")
    if spec.get("name", model) != model:
        problems.append(f"model_spec is for model {spec['name']}, but model is {model}: this config mixes two models")
    if spec.get("num_classes", num_classes) != num_classes:
        problems.append(f"model_spec.num_classes is {spec['num_classes']} but classes lists {num_classes}")
    if spec.get("img_size", img_size) != img_size:
        problems.append(f"model_spec.img_size is {spec['img_size']} but img_size is {img_size}")
    for knob in SPEC_KNOBS:
        if knob in spec and not same(spec[knob], getattr(hp, knob)):
            problems.append(f"model_spec.{knob}={spec[knob]} disagrees with hyperparameters.{knob}={getattr(hp, knob)}")


def same(a: object, b: object) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def load_file(path: str, requested_model: str | None) -> WinnerConfig:
    import yaml

    file = Path(path)
    if not file.is_file():
        raise UsageError(f"config file {path} does not exist: pass the best_config.yaml a study wrote (ray_results/<study>/best/)")
    try:
        raw = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError, OSError):
        raise UsageError(f"config file {path} is not valid YAML: pass the best_config.yaml a study wrote") from None
    return parse_config(raw, f"config {path}", requested_model)


# ---------------------------------------------------------------- MLflow sources


def load_study(tracking_uri: str, name: str, requested_model: str | None) -> WinnerConfig:
    """The best config of a study's parent run (the latest study of that name that has one)."""
    client = mlflow_client(tracking_uri, create=False)
    parents = study_runs(client, name)
    if not parents:
        known = sorted({run.data.tags[STUDY_TAG] for run in all_runs(client, f"tags.{STUDY_TAG} LIKE '%'") if is_study_run(run)})
        hint = f"; studies there: {', '.join(known[:8])}{' ...' if len(known) > 8 else ''}" if known else "; it holds no study"
        raise UsageError(f"no study named {name!r} in {tracking_uri}{hint}")
    for parent in parents:  # newest first
        if has_best_config(client, parent.info.run_id) and completed_trials(client, parent):
            return config_from_parent(client, parent, requested_model)
    raise UsageError(why_no_winner(client, parents[0], name))


def has_best_config(client, run_id: str) -> bool:
    return any(item.path == BEST_CONFIG for item in client.list_artifacts(run_id, "best"))


def trial_statuses(client, parent) -> list[str]:
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.`{PARENT_TAG}` = '{parent.info.run_id}'", max_results=50_000
    )
    return [child.data.tags.get(STATUS_TAG, "unknown") for child in children]


def completed_trials(client, parent) -> int:
    return trial_statuses(client, parent).count("completed")


def why_no_winner(client, parent, name: str) -> str:
    statuses = trial_statuses(client, parent)
    if parent.info.status == "RUNNING":
        return f"study {name!r} is still running (or its process died): retrain once it has finished"
    counts = ", ".join(f"{statuses.count(s)} {s}" for s in sorted(set(statuses))) or "no trials"
    return f"study {name!r} has no completed trial ({counts}): nothing to retrain; see its failed runs in MLflow"


def config_from_parent(client, parent, requested_model: str | None) -> WinnerConfig:
    import yaml

    with tempfile.TemporaryDirectory() as directory:
        raw = yaml.safe_load(Path(client.download_artifacts(parent.info.run_id, BEST_CONFIG, directory)).read_text())
    name = parent.data.tags[STUDY_TAG]
    return parse_config(raw, f"study {name}", requested_model, experiment_id=parent.info.experiment_id, run_id=parent.info.run_id)


def load_run(tracking_uri: str, run_id: str, requested_model: str | None) -> WinnerConfig:
    """One trial's configuration (or, given a study's parent run, the study's winner)."""
    from mlflow.exceptions import MlflowException

    client = mlflow_client(tracking_uri, create=False)
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise UsageError(f"no run with id {run_id} in {tracking_uri}") from None
    tags = run.data.tags
    if tags.get(ROLE_TAG) == FINAL_ROLE:
        raise UsageError(f"run {run_id} is a final retrain, not a trial: pass --config with its config.yaml to repeat it")
    if is_study_run(run):
        if not (has_best_config(client, run_id) and completed_trials(client, run)):
            raise UsageError(why_no_winner(client, run, tags[STUDY_TAG]))
        return config_from_parent(client, run, requested_model)
    if PARENT_TAG not in tags or STUDY_TAG not in tags:
        raise UsageError(f"run {run_id} is neither a study nor a trial of one (no '{STUDY_TAG}' tag)")
    status = tags.get(STATUS_TAG, "unknown")
    if status in ("failed", "running", "interrupted", "lost", "unknown"):
        raise UsageError(f"trial run {run_id} is {status}: pick a completed (or pruned) trial")
    return config_from_trial(client, run, client.get_run(tags[PARENT_TAG]), requested_model)


def config_from_trial(client, trial, parent, requested_model: str | None) -> WinnerConfig:
    """best_config.yaml's shape, rebuilt from a trial's params and history and its study's settings."""
    import json

    settings = parent.data.params
    metric = settings.get("metric", "val_acc")
    history = client.get_metric_history(trial.info.run_id, metric)
    if not history:
        raise UsageError(f"trial run {trial.info.run_id} reported no {metric}: nothing to retrain")
    sign = 1 if METRIC_MODES[metric] == "max" else -1
    best = max(history, key=lambda m: (sign * m.value, -m.step))  # the best score, first reached
    with tempfile.TemporaryDirectory() as directory:
        try:
            summary = json.loads(Path(client.download_artifacts(parent.info.run_id, "data.json", directory)).read_text())
        except Exception:  # an artifact store that lost the file: say what is missing
            raise UsageError(f"study run {parent.info.run_id} has no data.json: cannot tell the study's classes") from None
    known = set(Hyperparameters.names())
    raw = {
        "study": parent.data.tags.get(STUDY_TAG),
        "trial_id": trial.data.tags.get("ray_trial_id"),
        "metric": metric,
        "best_value": best.value,
        "best_epoch": int(best.step),
        "hyperparameters": {k: v for k, v in trial.data.params.items() if k in known},
        "classes": summary.get("classes"),
        "model": settings.get("model"),
        "epochs": as_int(settings.get("epochs")),
        "img_size": as_int(settings.get("img_size")),
        "seed": as_int(settings.get("seed")),
        "data": settings.get("data"),
        "smoke": settings.get("smoke") == "True",
        "pretrained": settings.get("pretrained", "True") == "True",
    }
    # Params are strings in MLflow: type them as the config file would.
    problems: list[str] = []
    typed = parse_hyperparameters(raw["hyperparameters"], raw["model"], problems)
    raw["hyperparameters"] = typed.to_dict()
    source = f"trial run {trial.info.run_id}"
    if problems:
        raise UsageError(f"{source}: " + "; ".join(problems))
    return parse_config(raw, source, requested_model, experiment_id=parent.info.experiment_id, run_id=trial.info.run_id)


def as_int(value: str | None) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None
