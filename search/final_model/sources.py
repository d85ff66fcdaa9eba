"""The winner's configuration from MLflow: a study's best (--study), or one trial or study run (--run-id).

A study's parent run holds its best_config.yaml. A trial's configuration is rebuilt in
that same form from its study's study.yaml, the trial's own hyperparameters.yaml and
its metric history (`Winner.from_trial`), then checked by the same `Winner.from_dict`.
"""

from __future__ import annotations

import json
import re

import yaml
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from sqlalchemy.exc import SQLAlchemyError

from search.errors import UsageError, one_line
from search.records.trial_status import TrialStatus
from search.records.winner import Winner, WinnerRefused
from search.tracking.schema import (
    DATA_SUMMARY,
    FINAL_ROLE,
    PARENT_TAG,
    ROLE_TAG,
    SPLIT_FILE,
    STATUS_TAG,
    STUDY_TAG,
    TRIAL_CONFIG,
    TRIAL_ID_TAG,
    TRIAL_LABEL_TAG,
)
from search.tracking.store import all_runs, is_study_run, mlflow_client, read_artifact, study_runs
from search.tracking.study_run import (
    SplitRecord,
    StudyLeaks,
    find_study,
    has_best_config,
    read_best_config,
    read_split_record,
    read_study_config,
    read_study_leaks,
)
from trainables.config import SEED

TRIAL_LABEL = re.compile(r"t\d{2,6}")
"""A search trial's name, as its study prints it and its run's `trial` tag holds it (t07)."""


def winner_from_mlflow(
    tracking_uri: str,
    *,
    study: str | None = None,
    trial: str | None = None,
    run_id: str | None = None,
    model: str | None = None,
) -> Winner:
    """The configuration of a study (with `trial`, one of its trials) or of one trial's run, as final.py's --study,
    --trial and --run-id name it; `model` is the one the user expects, if given."""
    try:
        if study is not None and trial:
            return load_study_trial(tracking_uri, study, trial, model)
        if study is not None:
            return load_study(tracking_uri, study, model)
        assert run_id is not None, "final.py's parser asks for --study, --run-id or --config"
        return load_run(tracking_uri, run_id, model)
    except (MlflowException, SQLAlchemyError) as error:  # a server that is down, a file that is no MLflow store
        raise UsageError(f"cannot read MLflow at {tracking_uri}: {one_line(error)}") from None


def load_study(tracking_uri: str, name: str, requested_model: str | None) -> Winner:
    """The best config of a study's parent run (the latest study of that name that has one)."""
    client = mlflow_client(tracking_uri, create=False)
    parents = study_runs(client, name)
    if not parents:
        known = sorted(
            {run.data.tags[STUDY_TAG] for run in all_runs(client, f"tags.{STUDY_TAG} LIKE '%'") if is_study_run(run)}
        )
        hint = (
            f"; studies there: {', '.join(known[:8])}{' ...' if len(known) > 8 else ''}"
            if known
            else "; it holds no study"
        )
        raise UsageError(f"no study named {name!r} in {tracking_uri}{hint}")
    for parent in parents:  # newest first
        if has_best_config(client, parent.info.run_id) and completed_trials(client, parent):
            return read_best_config(client, parent, requested_model)
    raise UsageError(why_no_winner(client, parents[0], name))


def load_study_trial(tracking_uri: str, name: str, label: str, requested_model: str | None) -> Winner:
    """Trial `label` (t07) of the newest study named `name`: a point of a multi-objective study's Pareto front,
    or any of its trials, retrained as --run-id retrains it."""
    if not TRIAL_LABEL.fullmatch(label):
        raise UsageError(f"--trial {label!r}: give a trial's name as the study printed it, e.g. t07")
    client = mlflow_client(tracking_uri, create=False)
    parents = study_runs(client, name)
    if not parents:
        raise UsageError(f"no study named {name!r} in {tracking_uri}: check --study")
    parent = parents[0]
    children = client.search_runs(
        [parent.info.experiment_id],
        f"tags.`{PARENT_TAG}` = '{parent.info.run_id}' and tags.{TRIAL_LABEL_TAG} = '{label}'",
    )
    trials = [run for run in children if ROLE_TAG not in run.data.tags]  # a search trial, not a retrain of one
    if not trials:
        raise UsageError(
            f"study {name!r} has no trial {label}: its trials are named in its runs (and a multi-objective study's "
            f"front in pareto_front.csv on its run)"
        )
    return load_run(tracking_uri, trials[0].info.run_id, requested_model)


def trial_statuses(client, parent) -> list[str]:
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.`{PARENT_TAG}` = '{parent.info.run_id}'", max_results=50_000
    )
    return [child.data.tags.get(STATUS_TAG, "unknown") for child in children]


def completed_trials(client, parent) -> int:
    return trial_statuses(client, parent).count(TrialStatus.COMPLETED)


def why_no_winner(client, parent, name: str) -> str:
    statuses = trial_statuses(client, parent)
    if parent.info.status == "RUNNING":
        return f"study {name!r} is still running (or its process died): retrain once it has finished"
    counts = ", ".join(f"{statuses.count(s)} {s}" for s in sorted(set(statuses))) or "no trials"
    return f"study {name!r} has no completed trial ({counts}): nothing to retrain; see its failed runs in MLflow"


def load_run(tracking_uri: str, run_id: str, requested_model: str | None) -> Winner:
    """One trial's configuration (or, given a study's parent run, the study's winner)."""
    client = mlflow_client(tracking_uri, create=False)
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise UsageError(f"no run with id {run_id} in {tracking_uri}") from None
    tags = run.data.tags
    if tags.get(ROLE_TAG) == FINAL_ROLE:
        raise UsageError(
            f"run {run_id} is a final retrain, not a trial: pass --config with its config.yaml to repeat it"
        )
    if is_study_run(run):
        if not (has_best_config(client, run_id) and completed_trials(client, run)):
            raise UsageError(why_no_winner(client, run, tags[STUDY_TAG]))
        return read_best_config(client, run, requested_model)
    if PARENT_TAG not in tags or STUDY_TAG not in tags:
        raise UsageError(f"run {run_id} is neither a study nor a trial of one (no '{STUDY_TAG}' tag)")
    status = tags.get(STATUS_TAG, "unknown")
    if status not in (TrialStatus.COMPLETED, TrialStatus.PRUNED):
        raise UsageError(f"trial run {run_id} is {status}: pick a completed (or pruned) trial")
    return config_from_trial(client, run, client.get_run(tags[PARENT_TAG]), requested_model)


def config_from_trial(client, trial, parent, requested_model: str | None) -> Winner:
    """best_config.yaml's form for one trial: its study's settings, its hyperparameters, its best epoch, its name.

    The best epoch is the last at which the trial reached its best score: the checkpoint Ray keeps of it
    (among equal scores, the newer), and the epoch a study's own winner record gives for the same trial."""
    config = read_study_config(client, parent)
    source = f"trial run {trial.info.run_id}"
    history = client.get_metric_history(trial.info.run_id, config.metric)
    if not history:
        raise UsageError(f"trial run {trial.info.run_id} reported no {config.metric}: nothing to retrain")
    sign = 1 if config.mode == "max" else -1
    best = max(history, key=lambda m: (sign * m.value, m.step))  # the best score, last reached
    try:
        hyperparameters = yaml.safe_load(read_artifact(client, trial.info.run_id, TRIAL_CONFIG) or "null")
    except yaml.YAMLError:
        hyperparameters = None
    data = read_artifact(client, parent.info.run_id, DATA_SUMMARY)
    if not isinstance(hyperparameters, dict) or data is None:
        raise UsageError(
            f"{source} lacks its {TRIAL_CONFIG} or its study's data.json: retrain the study's "
            f"winner with --study {config.name}, or pass --config"
        )
    hyperparameters.pop(SEED, None)  # a confirmation's retrain: final.py trains with the study's seed
    try:
        return Winner.from_trial(
            config,
            trial_id=trial.data.tags.get(TRIAL_ID_TAG),
            metrics={config.metric: best.value, "epoch": best.step},
            hyperparameters=hyperparameters,
            classes=json.loads(data)["classes"],
            trial=trial.data.tags.get(TRIAL_LABEL_TAG),
            requested_model=requested_model,
            source=source,
            experiment_id=parent.info.experiment_id,
            run_id=trial.info.run_id,
        )
    except WinnerRefused as error:
        raise UsageError(str(error)) from None


def study_split_record(tracking_uri: str, config: Winner) -> tuple[SplitRecord | None, str]:
    """The split.json of the study `config` comes from (its parent run, found from the run the configuration was
    read from, or for a config file by the study it names), and ''; or None, and why there is no record to follow."""
    try:
        parent = study_of(tracking_uri, config)
        if parent is None:
            where = f"--tracking-uri {tracking_uri} holds no study {config.study!r}" if config.study else "no study"
            return None, f"{config.source} names {where}"
        record = read_split_record(mlflow_client(tracking_uri, create=False), parent)
    except (MlflowException, SQLAlchemyError) as error:
        raise UsageError(f"cannot read MLflow at {tracking_uri}: {one_line(error)}") from None
    name = parent.data.tags.get(STUDY_TAG)
    if record is None:
        return None, f"study {name!r} predates {SPLIT_FILE} (it was run by an older version of this tool)"
    if record.seed != config.split.seed:  # a config file's study name, taken again by a study of other settings
        return None, (
            f"study {name!r} in --tracking-uri {tracking_uri} split with seed {record.seed}, not {config.split.seed}"
        )
    return record, ""


def study_leaks(tracking_uri: str, config: Winner) -> StudyLeaks | None:
    """The leakage check's counts as the study's run recorded them (its leak_* metrics; none for a study that
    predates the check); None where the study's run cannot be reached (a config file of no study in the store, a
    store that does not answer): the checklist then says to see the study run. Read after training, so it never
    fails the run."""
    try:
        parent = study_of(tracking_uri, config)
    except (MlflowException, SQLAlchemyError, KeyError):
        return None
    return None if parent is None else read_study_leaks(parent)


def study_of(tracking_uri: str, config: Winner) -> Run | None:
    """The parent run of the study a winner's configuration comes from; None for a config file whose study is not
    in the store (or that names none)."""
    if config.run_id is not None:  # --study, --run-id: the run it was read from, a study's or one of its trials
        client = mlflow_client(tracking_uri, create=False)
        run = client.get_run(config.run_id)
        return run if is_study_run(run) else client.get_run(run.data.tags[PARENT_TAG])
    return find_study(tracking_uri, config.study) if config.study else None
