"""Which studies a comparison compares, and how far each has got: the one place that decides what to (re)do.

A comparison named C runs the studies C-cnn, C-vit and C-hybrid. Everything it does is
found again in MLflow, so running the same command again after Ctrl-C or a kill
continues: a finished study is kept, an unfinished one resumed, a missing one started;
a retrain is reused when a finished final run of the study recorded its per-image test
predictions. With --studies, the named studies are compared as they are.

Standard library, PyYAML and MLflow only: the plan is made and checked before torch loads.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from search.errors import UsageError
from search.records.study_config import StudyConfig
from search.study.config import changed_settings, new_config
from search.study.preflight import check_study
from search.tracking.schema import ROLE_TAG, STUDY_TAG, store_exists
from search.tracking.store import all_runs, mlflow_client, quoted
from search.tracking.study_run import SplitRecord, find_study, read_split_record, read_study_config
from trainables.manifest import shown

if TYPE_CHECKING:
    from mlflow.entities import Run

COMPARISON_TAG = "comparison"
ENSEMBLE_SETTING_TAG = "comparison_ensemble"
"""On each of a comparison's own studies: the --ensemble K it was run with ('0': none), so that continuing it with
another is refused as another budget is (a study without the tag predates it: anything goes)."""
COMPARISON_ROLE, REFERENCE_ROLE = "comparison", "reference"
REFERENCE_MODEL_TAG = "reference_model"
SPLIT_SETTINGS = ("data", "seed", "smoke")
"""Studies that agree on these hold out the same test images."""
BUDGET_SETTINGS = (
    "trials",
    "epochs",
    "img_size",
    "window",
    "fidelity",
    "metric",
    "objective",
    "pretrained",
    "grace_period",
    "reduction_factor",
    "confirm",
    "confirm_seeds",
    "recipe",
)
"""What else the comparison's own studies share: the same budget, recipe and way of picking the winner."""


@dataclass(frozen=True)
class Entry:
    """One compared study and what is left to do for it."""

    label: str
    """How the report names it: the model, or the study's name where two studies search one model."""
    config: StudyConfig
    """As recorded on the study's run, or, for a study not started yet, as it will be."""
    state: str
    """'new' (not started), 'unfinished' (to resume) or 'finished'."""

    @property
    def study(self) -> str:
        return self.config.name


@dataclass(frozen=True)
class Plan:
    name: str
    entries: list[Entry]
    tracking_uri: str


def plan_comparison(args: argparse.Namespace, run_argv: list[str]) -> Plan:
    """The comparison's own studies, <name>-<model>, each checked as run.py would check it."""
    entries = []
    for model in args.models:
        study_args = argparse.Namespace(**{**vars(args), "model": model, "name": f"{args.name}-{model}", "space": None})
        requested = new_config(study_args)
        parent = find_study(args.tracking_uri, requested.name)
        if parent is None:
            check_study(requested)  # space, data, model and image size: refused now, not after the first study
            entries.append(Entry(model, requested, "new"))
            continue
        recorded = read_study_config(mlflow_client(args.tracking_uri, create=False), parent)
        refuse_changed_settings(args.name, recorded, requested, run_argv)
        refuse_changed_ensemble(args.name, parent, args.ensemble)
        entries.append(Entry(model, recorded, "finished" if parent.info.status == "FINISHED" else "unfinished"))
    return Plan(args.name, entries, args.tracking_uri)


def refuse_changed_settings(comparison: str, recorded: StudyConfig, requested: StudyConfig, argv: list[str]) -> None:
    changed = changed_settings(recorded, requested, SPLIT_SETTINGS + BUDGET_SETTINGS)
    if changed:
        raise UsageError(
            f"comparison {comparison!r} ran study {recorded.name} with other settings: {', '.join(changed)}; "
            f"repeat its settings to continue it, or pass another --name for a new comparison"
        )


def ensemble_setting(ensemble: int | None) -> str:
    """--ensemble as ENSEMBLE_SETTING_TAG holds it."""
    return str(ensemble or 0)


def refuse_changed_ensemble(comparison: str, parent, ensemble: int | None) -> None:
    """A comparison continued with another --ensemble than it started with is refused, as another budget is."""
    recorded = parent.data.tags.get(ENSEMBLE_SETTING_TAG)
    if recorded is None or recorded == ensemble_setting(ensemble):
        return
    then = "without --ensemble" if recorded == "0" else f"with --ensemble {recorded}"
    now = "without it" if not ensemble else f"not {ensemble}"
    raise UsageError(
        f"comparison {comparison!r} ran study {parent.data.tags[STUDY_TAG]} {then}, {now}; repeat its settings "
        f"to continue it, or pass another --name for a new comparison"
    )


def check_ensemble(plan: Plan, ensemble: int | None) -> None:
    """--ensemble K, before anything runs: each study can hold K configurations, and their validation scores
    (which choose the ensemble's study, never the test) are of one metric."""
    if ensemble is None:
        return
    few = [entry for entry in plan.entries if entry.config.trials < ensemble]
    if few:
        raise UsageError(
            f"--ensemble {ensemble}: study {few[0].study} has {few[0].config.trials} trials, fewer than the "
            f"ensemble's members; ask for more --trials or a smaller --ensemble"
        )
    metrics = dict.fromkeys(entry.config.metric for entry in plan.entries)
    if len(metrics) > 1:
        raise UsageError(
            f"--ensemble {ensemble}: the studies optimise different metrics ({', '.join(metrics)}), so their "
            f"validation scores cannot choose the study whose ensemble is built; compare studies of one --metric"
        )


def plan_existing(args: argparse.Namespace) -> Plan:
    """--studies: finished studies, compared as they are; they must share a split."""
    if not store_exists(args.tracking_uri):
        raise UsageError(f"--tracking-uri {args.tracking_uri} holds no MLflow store: run the studies first")
    client = mlflow_client(args.tracking_uri, create=False)
    configs, parents = [], []
    for name in args.studies:
        parent = find_study(args.tracking_uri, name)
        if parent is None:
            raise UsageError(f"no study named {name!r} in --tracking-uri {args.tracking_uri}: check --studies")
        config = read_study_config(client, parent)
        if parent.info.status != "FINISHED":
            raise UsageError(
                f"study {name!r} has not finished: continue it first with "
                f"python search/run.py --model {config.model} --name {name} --resume"
            )
        configs.append(config)
        parents.append(parent)
    first = configs[0]
    for config in configs[1:]:
        differ = [
            f"{key} {getattr(first, key)} vs {getattr(config, key)}"
            for key in SPLIT_SETTINGS
            if getattr(first, key) != getattr(config, key)
        ]
        if differ:
            raise UsageError(
                f"studies {first.name} and {config.name} held out different test images ({', '.join(differ)}): "
                f"compare studies run on the same --data, --seed and --smoke"
            )
    refuse_different_test_splits(client, parents)
    models = [config.model for config in configs]
    entries = [
        Entry(config.model if models.count(config.model) == 1 else config.name, config, "finished")
        for config in configs
    ]
    return Plan(args.name, entries, args.tracking_uri)


def refuse_different_test_splits(client, parents: list) -> None:
    """Compared studies must have held out the very same test images, as their split.json recorded them: the same
    data, seed and --smoke cut other test splits once the data changed between two studies (an edited manifest, a
    file added). A study without the record (an older one) is judged by its settings alone."""
    records = [record for parent in parents if (record := read_split_record(client, parent)) is not None]
    for record in records[1:]:
        difference = held_out_difference(records[0], record)
        if difference:
            raise UsageError(
                f"studies {records[0].study} and {record.study} held out different test images ({difference}): "
                f"the data changed between them; compare studies run on the same data, or run them again on it"
            )


def held_out_difference(first: SplitRecord, second: SplitRecord) -> str:
    """How two studies' recorded test splits differ, in words; '' where they hold the same images in one order."""
    a, b = first.images["test"], second.images["test"]
    in_a, in_b = set(a), set(b)
    only_first, only_second = [key for key in a if key not in in_b], [key for key in b if key not in in_a]
    if only_first or only_second:
        return "; ".join(
            f"{len(keys)} of {one.study}'s are not in {other.study}'s, e.g. {shown(keys)}"
            for keys, one, other in ((only_first, first, second), (only_second, second, first))
            if keys
        )
    return "the same images in another order" if a != b else ""


FORWARD_PASSES_METRIC, MEMBERS_METRIC, TTA_METRIC = "forward_passes", "ensemble_members", "tta_forward_passes"
"""What a final run of final.py --ensemble K or --tta logs (search.final_model.ensemble.Outcome.metrics): the
forward passes per image, the ensemble's members, the passes with the flips. A plain retrain logs none of them."""


def finished_retrain(client, study: str, predictions_file: str) -> str | None:
    """The newest finished final run of `study` that retrained its winner alone (no ensemble, no test-time flips)
    and recorded its per-image test predictions."""
    return newest_with_file(
        client,
        f"tags.{ROLE_TAG} = 'final' and tags.{STUDY_TAG} = {quoted(study)}",
        predictions_file,
        keep=lambda run: FORWARD_PASSES_METRIC not in run.data.metrics,
    )


def finished_ensemble(client, study: str, k: int, predictions_file: str) -> str | None:
    """The newest finished final run of `study`'s K best configurations as an ensemble, without test-time flips
    (final.py --study S --ensemble K), that recorded its per-image test predictions."""
    return newest_with_file(
        client,
        f"tags.{ROLE_TAG} = 'final' and tags.{STUDY_TAG} = {quoted(study)} and metrics.{MEMBERS_METRIC} = {k}",
        predictions_file,
        keep=lambda run: TTA_METRIC not in run.data.metrics,
    )


def finished_reference(client, comparison: str, backbone: str, predictions_file: str) -> str | None:
    """The newest finished run of this comparison's reference model."""
    return newest_with_file(
        client,
        f"tags.{ROLE_TAG} = '{REFERENCE_ROLE}' and tags.{COMPARISON_TAG} = {quoted(comparison)} "
        f"and tags.{REFERENCE_MODEL_TAG} = {quoted(backbone)}",
        predictions_file,
    )


def newest_with_file(
    client, filter_string: str, path: str, keep: Callable[[Run], bool] = lambda run: True
) -> str | None:
    """The newest finished run matching filter_string (and `keep`) that holds the file `path`."""
    runs = all_runs(client, f"{filter_string} and attributes.status = 'FINISHED'")
    return next((run.info.run_id for run in runs if keep(run) and has_file(client, run.info.run_id, path)), None)


def has_file(client, run_id: str, path: str) -> bool:
    return any(item.path == path for item in client.list_artifacts(run_id))
