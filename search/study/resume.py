"""--resume: the interrupted study's own configuration, read back from its parent run's study.yaml, and its split
checked against its split.json."""

from __future__ import annotations

import argparse
from collections.abc import Collection
from dataclasses import fields, replace

from search.cli import weights_files, weights_problems
from search.errors import UsageError
from search.records.study_config import STUDY_NAME, ConfigError, StudyConfig, name_problem
from search.study.config import absolute, changed_settings, new_config
from search.study.storage import exists, resolved
from search.tracking.optuna_store import study_exists
from search.tracking.schema import SPLIT_FILE, absolute_uri, check_store_uri
from search.tracking.store import mlflow_client
from search.tracking.study_run import SplitRecord, find_study, read_split_record, read_study_config
from trainables.data import DatasetIndex
from trainables.manifest import shown

TUNER_STATE = "tuner.pkl"
"""What Ray's Tuner.restore reads first in the study's experiment folder."""
TAKEN_ON_RESUME = frozenset(
    {"name", "model", "trials", "storage_path", "cache_dir", "tracking_uri", "weights", "optuna_storage"}
)
"""Settings --resume takes from the command line, not from study.yaml: which study (--model is checked on its own),
where this machine keeps things, --trials (a new total extends a finished study) and --optuna-storage (checked on its
own). Every other setting given must be the study's."""
TAKEN_ON_EXTENSION = frozenset({"confirm", "confirm_seeds"})
"""What an extension may change besides --trials."""
SETTING_OF_FLAG = {"no_pretrained": "pretrained", "no_recipe": "recipe"}
"""A flag whose dest is not its setting's name."""


def resumed_config(args: argparse.Namespace, given: Collection[str]) -> tuple[StudyConfig, str]:
    """The study's recorded configuration and its parent run; refuse what cannot resume.

    Only where this machine keeps things comes from the command line: --storage-path (where
    the trials are), --cache-dir, --tracking-uri and, if given, --weights. `given`: the dests of
    the flags the command line set (search.cli.given_options); any other setting among them
    that differs from the study's is refused.
    """
    if not args.name:
        raise UsageError("--resume needs --name STUDY: the name the interrupted run printed")
    problems = weights_problems(args.weights) + ([] if STUDY_NAME.fullmatch(args.name) else [name_problem(args.name)])
    if problems:
        raise UsageError("; ".join(problems))
    check_store_uri(args.tracking_uri)
    parent = find_study(args.tracking_uri, args.name)
    where = f"--tracking-uri {args.tracking_uri}"
    if parent is None:
        raise UsageError(f"no study named {args.name!r} in {where}: check --name, or start it without --resume")
    storage = resolved(args.storage_path)
    if not exists(storage, args.name, TUNER_STATE):
        raise UsageError(
            f"study {args.name!r} has no trial state under --storage-path {args.storage_path}: pass the one it ran with"
        )
    searched = parent.data.tags.get("model")  # the tag the parent run was opened with
    if searched != args.model:
        raise UsageError(
            f"study {args.name!r} searched --model {searched}: resume it with that model, not {args.model}"
        )
    recorded = read_study_config(mlflow_client(args.tracking_uri, create=False), parent)
    extending = args.trials is not None and args.trials != recorded.trials
    check_extension(args, recorded, parent.info.status, extending)
    if recorded.optuna_storage is None:  # Ray would bring back callbacks and a searcher of that older shape
        raise UsageError(
            f"study {args.name!r} was run by an older version of this tool (its Optuna study has no database), "
            f"which this one cannot continue: start a new study, or retrain one of its trials with "
            f"final.py --run-id RUN"
        )
    if args.optuna_storage and absolute_uri(args.optuna_storage) != recorded.optuna_storage:
        raise UsageError(
            f"--optuna-storage cannot change on --resume: study {args.name!r} continues in "
            f"{recorded.optuna_storage}; leave the flag out"
        )
    refuse_changed_settings(args, given, recorded, extending)
    if not study_exists(recorded.optuna_storage, args.name):
        raise UsageError(
            f"the Optuna storage {recorded.optuna_storage} no longer holds study {args.name!r} (moved or deleted?): "
            f"put that file back, the study continues there"
        )
    given_weights = weights_files(args.weights)
    if extending:
        recorded = extended(recorded, args)
    config = replace(
        recorded,
        storage_path=storage,
        cache_dir=absolute(args.cache_dir),
        tracking_uri=args.tracking_uri,
        weights=given_weights or recorded.weights,
    )
    return config, parent.info.run_id


def check_extension(args: argparse.Namespace, recorded: StudyConfig, status: str, extending: bool) -> None:
    """--resume continues an interrupted study; with more --trials, it extends a finished one."""
    name, ran = args.name, recorded.trials
    if extending and args.trials < ran:
        raise UsageError(f"--trials {args.trials}: study {name!r} has {ran} already; give more to extend it")
    if extending and status != "FINISHED":
        raise UsageError(
            f"study {name!r} did not finish its {ran} trials: resume it first without --trials, then extend it"
        )
    if not extending and status == "FINISHED":
        raise UsageError(
            f"study {name!r} already finished its {ran} trials: extend it with --resume --trials N (N > {ran}), "
            f"or start a new one with another --name"
        )


def refuse_changed_settings(
    args: argparse.Namespace, given: Collection[str], recorded: StudyConfig, extending: bool
) -> None:
    """A setting flag given on --resume must repeat the study's: its trials ran with its own, and the new ones do
    too. Refused in one line, as compare.py refuses continuing a study with other settings."""
    taken = TAKEN_ON_RESUME | (TAKEN_ON_EXTENSION if extending else frozenset())
    asked = {SETTING_OF_FLAG.get(dest, dest) for dest in given if dest not in taken}
    # The flags as a new study would record them (paths absolute, --no-pretrained as pretrained), in the study's
    # own Optuna storage: a default storage that cannot be placed is no problem of a study that has one.
    requested = new_config(argparse.Namespace(**{**vars(args), "optuna_storage": recorded.optuna_storage}))
    # A setting left to be resolved ('auto' GPU share) matches the value the study resolved.
    keys = [f.name for f in fields(StudyConfig) if f.name in asked and getattr(requested, f.name) is not None]
    changed = changed_settings(recorded, requested, keys)
    if changed:
        raise UsageError(
            f"study {args.name!r} ran with other settings: {', '.join(changed)}; --resume continues it with its "
            f"own: leave those flags out, or start a new study with another --name"
        )


def extended(recorded: StudyConfig, args: argparse.Namespace) -> StudyConfig:
    """A finished study's configuration with more trials: the new ones continue the same Optuna study in a Tune run
    of their own. --confirm and --confirm-seeds may change. A warm start is not repeated: its configurations are
    among the earlier trials already."""
    try:
        return replace(
            recorded,
            trials=args.trials,
            trials_before=recorded.trials,
            confirm=recorded.confirm if args.confirm is None else args.confirm,
            confirm_seeds=recorded.confirm_seeds if args.confirm_seeds is None else args.confirm_seeds,
        )
    except ConfigError as error:
        raise UsageError(str(error)) from None


def check_resumed_split(config: StudyConfig, run_id: str, index: DatasetIndex) -> None:
    """The data, indexed again for --resume (`index`: split and subsampled as the study will use it), must split as
    the study recorded it: new trials on another split would train and score on other images than the first, and
    its test split would hold images its trials trained on. Refused in one line naming what changed."""
    client = mlflow_client(config.tracking_uri, create=False)
    record = read_split_record(client, client.get_run(run_id))
    if record is None:
        print(
            f"note: study {config.name!r} predates {SPLIT_FILE}: its split could not be checked against its record; "
            f"resuming on the data split again with its seed {config.seed}",
            flush=True,
        )
        return
    changes = split_changes(record, index)
    change = record.manifest_change(index.source)
    if changes:
        what = "; ".join(([change] if change else []) + changes)
        raise UsageError(
            f"the data of study {config.name!r} no longer splits as it did ({what}): "
            f"its new trials would search on another split than its first; put the data back as it was, or start a "
            f"new study with another --name"
        )
    if change:
        print(f"note: {change}, but it splits the same images: resuming", flush=True)


def split_changes(record: SplitRecord, index: DatasetIndex) -> list[str]:
    """How the index's split differs from the recorded one, in words ([] for none): the recorded images now gone,
    those in another split, and images new to it (the ones the study could not decode aside)."""
    recorded = record.split_of()
    now = {sample.key: split for split, samples in index.splits.items() for sample in samples}
    gone = [key for key in recorded if key not in now]
    moved = [f"{key}: {recorded[key]} -> {now[key]}" for key in recorded if key in now and now[key] != recorded[key]]
    new = [key for key in now if key not in recorded and key not in record.skipped]
    return [
        f"{len(keys)} {what} (e.g. {shown(keys)})"
        for keys, what in (
            (gone, "of its images are gone"),
            (moved, "of its images are in another split"),
            (new, "image(s) are new"),
        )
        if keys
    ]
