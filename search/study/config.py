"""A study's configuration from run.py's (and compare.py's) arguments: every default resolved, every problem
listed at once.

The record itself, its checks and its one loader are search.records.study_config's; what is
here needs the command line, the storage and the stores (a new study's name is looked up in
the storage, perhaps a bucket, with pyarrow).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from dataclasses import asdict, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from search.cli import parse_window, weights_files, weights_problems
from search.errors import UsageError
from search.records.study_config import FULL, SMOKE, STUDY_DEFAULTS, ConfigError, StudyConfig
from search.study import storage
from search.tracking.schema import absolute_uri, default_optuna_storage
from trainables.config import SpeedOptions, is_synthetic

SPACES_DIR = Path(__file__).resolve().parents[2] / "spaces"


def new_config(args: argparse.Namespace) -> StudyConfig:
    """The study's configuration from run.py's arguments, every default resolved; a UsageError lists every problem."""
    problems = weights_problems(args.weights)
    try:
        window = parse_window(args.window)
    except UsageError as error:
        problems.append(str(error))
        window = None
    profile = SMOKE if args.smoke else FULL
    location = storage.resolved(args.storage_path)
    optuna_storage = absolute_uri(args.optuna_storage) if args.optuna_storage else None  # --resume may run elsewhere
    if optuna_storage is None:
        optuna_storage = default_optuna_storage(args.tracking_uri, location)
        if optuna_storage is None:
            problems.append(
                f"--storage-path {location}: Optuna's SQLite database cannot live there, and --tracking-uri is "
                f"no SQLite store to put it beside: give --optuna-storage sqlite:///PATH/optuna.db (a file this "
                f"machine keeps) or a database URL such as postgresql://HOST/DB"
            )
    try:
        config = StudyConfig(
            name=args.name or args.model,  # a new study's own name is drawn below
            model=args.model,
            trials=given_or_default(args, "trials"),
            data=resolved_source(args.data),
            window=window,
            space=absolute(args.space or SPACES_DIR / f"{args.model}.yaml"),
            metric=args.metric,
            objective=args.objective,
            seed=args.seed,
            on_leak=given_or_default(args, "on_leak"),
            epochs=profile.epochs if args.epochs is None else args.epochs,
            img_size=profile.img_size if args.img_size is None else args.img_size,
            fidelity=given_or_default(args, "fidelity"),
            smoke=args.smoke,
            pretrained=not args.no_pretrained,
            weights=weights_files(args.weights),
            **asdict(SpeedOptions.of(args)),  # the CUDA speed flags, each a setting of the same name
            gpus_per_trial=None if args.gpus_per_trial == "auto" else args.gpus_per_trial,
            cpus_per_trial=args.cpus_per_trial,
            max_concurrent=args.max_concurrent,
            max_failures=args.max_failures,
            grace_period=args.grace_period,
            reduction_factor=args.reduction_factor,
            storage_path=location,
            cache_dir=absolute(args.cache_dir),
            tracking_uri=args.tracking_uri,
            experiment=args.experiment or args.model,
            optuna_storage=optuna_storage,
            warm_start=getattr(args, "warm_start", None),  # run.py's alone: compare.py runs a study per model
            warm_start_top=given_or_default(args, "warm_start_top"),
            confirm=given_or_default(args, "confirm"),
            confirm_seeds=given_or_default(args, "confirm_seeds"),
            recipe=not getattr(args, "no_recipe", False),
            subgroups=getattr(args, "subgroups", None) or (),  # run.py's alone, as --warm-start
        )
    except ConfigError as error:
        problems.insert(0, str(error))
    if problems:
        raise UsageError("; ".join(problems))
    # Drawn once the arguments are good: which names are taken is a question to the storage, perhaps a bucket.
    return config if args.name else replace(config, name=new_study_name(args.model, location))


def changed_settings(recorded: StudyConfig, requested: StudyConfig, keys: Iterable[str]) -> list[str]:
    """'epochs 3 (now 5)' for each setting of `keys` that the command line asks otherwise than the study recorded:
    what compare.py and --resume refuse to continue a study with, in one line."""
    return [
        f"{key} {getattr(recorded, key)} (now {getattr(requested, key)})"
        for key in keys
        if getattr(recorded, key) != getattr(requested, key)
    ]


def given_or_default(args: argparse.Namespace, name: str) -> Any:
    """A setting's value from the command line, or the record's default where the flag was left out (None) or
    does not exist (compare.py's)."""
    value = getattr(args, name, None)
    return STUDY_DEFAULTS[name] if value is None else value


def absolute(path: str | Path) -> str:
    return str(Path(path).expanduser().resolve())


def resolved_source(data: str) -> str:
    """'synthetic[:C]' as it is, a folder as its absolute path: what the study records."""
    return data if is_synthetic(data) else absolute(data)


def new_study_name(model: str, storage_path: str) -> str:
    """<model>-<timestamp>, with a suffix if a study of that second exists already under the storage."""
    stem = f"{model}-{datetime.now():%Y%m%d-%H%M%S}"
    name, number = stem, 1
    while storage.exists(storage_path, name):
        number += 1
        name = f"{stem}-{number}"
    return name
