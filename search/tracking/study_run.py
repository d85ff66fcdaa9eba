"""The study's parent run: its stores and name claimed, opened with the study's configuration and data,
reopened on --resume, given the winner.

The configuration goes on the run once, as study.yaml (StudyConfig.to_yaml); its
values are also the run's params, for people and the UI's filters. `read_study_config`
is how --resume and final.py get it back. The data goes on it (and on each trial's and
the final retrain's run) as an MLflow dataset input, `data_record`; which images (and patients) each split
holds as split.json; the leakage check's counts as metrics and its pairs as leakage.csv.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from mlflow.entities import LoggedModelOutput, LoggedModelStatus, Metric, Param
from mlflow.tracking import MlflowClient

from search.errors import UsageError, one_line
from search.study.config import CONFIG_FILE, ConfigError, StudyConfig
from search.study.leaks import LeakReport
from search.study.preflight import name_taken
from search.tracking.optuna_store import existing_optuna_storage, holds, open_optuna_storage
from search.tracking.runs_view import runs_view, save_runs_view
from search.tracking.schema import (
    BEST_CONFIG_FILE,
    BEST_DIR,
    DATA_SUMMARY,
    LEAKS_FILE,
    SPLIT_FILE,
    STUDY_TAG,
    store_exists,
)
from search.tracking.store import (
    get_or_create_experiment,
    log_data_input,
    log_params,
    mlflow_client,
    read_artifact,
    study_runs,
)
from trainables.data import SPLITS, DatasetIndex, data_digest, manifest_digest
from trainables.leakage import MIN_CORRELATION, NEAR_BITS


def open_stores(config: StudyConfig, resume_run_id: str | None, *, create: bool = True) -> None:
    """The MLflow store and the Optuna database, created (or migrated) before the long work; a new study's name
    must be new in both (Optuna would add its trials to the old one's).

    run.py asks first with create=False, before torch and Ray load: a taken name is answered in seconds, and
    stores that do not exist yet are left for the driver to create once every other check has passed.
    """
    url = config.optuna_storage
    client: MlflowClient | None
    if create:  # a bad --optuna-storage fails here, before any run opens
        client = mlflow_client(config.tracking_uri)
        optuna_storage = open_optuna_storage(url) if url else None
    else:
        client = mlflow_client(config.tracking_uri, create=False) if store_exists(config.tracking_uri) else None
        optuna_storage = existing_optuna_storage(url) if url else None
    if resume_run_id is not None:
        return
    if client is not None and study_runs(client, config.name):
        raise UsageError(name_taken(config.name, f"in --tracking-uri {config.tracking_uri}"))
    if holds(optuna_storage, config.name):
        raise UsageError(name_taken(config.name, f"in --optuna-storage {url}"))


def open_parent_run(
    client: MlflowClient,
    config: StudyConfig,
    index: DatasetIndex,
    dataset: dict,
    skipped: list[str],
    knobs: list[str],
    *,
    leaks: LeakReport | None = None,
) -> tuple[str, str]:
    """A new study's parent run, with its configuration, data summary, split and input (`dataset`: data_record's),
    space file, leakage check, and the study's view of the runs page (`knobs`: the searched ones, as its columns):
    (experiment id, run id)."""
    experiment_id = get_or_create_experiment(client, config.experiment, config.tracking_uri)
    parent = client.create_run(
        experiment_id, run_name=config.name, tags={STUDY_TAG: config.name, "model": config.model}
    )
    parent_id = parent.info.run_id
    summary = {key: value for key, value in index.summary().items() if key not in ("source", "classes")}
    shown = {key: value for key, value in config.to_dict().items() if key != "format"}
    log_params(
        client,
        parent_id,
        {**shown, "mode": config.mode, **summary, "ignored_files": index.ignored_files, "skipped_images": len(skipped)},
    )
    client.log_text(parent_id, config.to_yaml(), CONFIG_FILE)
    client.log_dict(parent_id, index.summary(), DATA_SUMMARY)
    client.log_dict(parent_id, split_record(index, config.seed), SPLIT_FILE)
    client.log_artifact(parent_id, config.space)
    log_data_input(client, parent_id, dataset)
    save_runs_view(client, experiment_id, config, runs_view(config, parent_id, knobs))
    if skipped:
        client.log_metric(parent_id, "skipped_images", len(skipped))
        client.log_text(parent_id, "\n".join(skipped), "skipped_images.txt")
    if leaks is not None:
        log_leaks(client, parent_id, leaks)
    return experiment_id, parent_id


def split_record(index: DatasetIndex, seed: int) -> dict:
    """split.json: which images, and which patients, each split holds. Patient ids may be sensitive: they go in this
    file only, never in params (which show their counts)."""
    record: dict = {"source": index.source, "seed": seed}
    if index.is_manifest:
        record["manifest_digest"] = manifest_digest(index.source)
    for split in SPLITS:
        record[split] = {"images": [sample.key for sample in index.splits.get(split, [])]}
        if index.has_groups:
            record[split]["groups"] = index.groups(split)
    return record


def log_leaks(client: MlflowClient, parent_id: str, leaks: LeakReport) -> None:
    """The leakage check's counts per pair of splits as metrics (leak_exact_train_test, ...) and every pair found as
    leakage.csv."""
    stamp = int(time.time() * 1000)
    client.log_batch(
        parent_id,
        metrics=[Metric(name, count, stamp, 0) for name, count in leaks.counts().items()],
        params=[Param("leak_near_bits", str(NEAR_BITS)), Param("leak_min_correlation", str(MIN_CORRELATION))],
    )
    if leaks.duplicates:
        client.log_text(parent_id, leaks.table(), LEAKS_FILE)


def reopen_parent_run(client: MlflowClient, run_id: str) -> str:
    """An interrupted study's parent run, RUNNING again: its experiment id."""
    client.update_run(run_id, status="RUNNING")
    return client.get_run(run_id).info.experiment_id


def find_study(tracking_uri: str, name: str):
    """The newest parent run of study `name`, or None; opens no new store."""
    if not store_exists(tracking_uri):
        return None
    parents = study_runs(mlflow_client(tracking_uri, create=False), name)
    return parents[0] if parents else None


def read_study_config(client: MlflowClient, run) -> StudyConfig:
    """The study.yaml of a study's parent run; a one-line UsageError for a study that predates it."""
    name = run.data.tags.get(STUDY_TAG, run.info.run_id)
    text = read_artifact(client, run.info.run_id, CONFIG_FILE)
    if text is None:
        raise UsageError(
            f"study {name!r} predates {CONFIG_FILE} (it was run by an older version of this tool): "
            f"start a new study, or retrain its winner with final.py --study {name}"
        )
    try:
        return StudyConfig.from_yaml(text, f"{CONFIG_FILE} of study {name!r}")
    except ConfigError as error:
        raise UsageError(str(error)) from None


def data_record(index: DatasetIndex) -> dict:
    """The study's data as the fields of an MLflow Dataset: the runs table's Dataset column shows it."""
    synthetic = index.is_synthetic
    counts = {f"{split}_images": len(index.splits[split]) for split in SPLITS if split in index.splits}
    return {
        "name": index.source if synthetic else Path(index.source).name,
        "digest": data_digest(index),
        "source_type": "code" if synthetic else "local",
        "source": json.dumps({"uri": index.source if synthetic else Path(index.source).as_uri()}),
        "profile": json.dumps({"num_classes": len(index.classes), "num_images": sum(counts.values()), **counts}),
    }


def log_best(client: MlflowClient, config: StudyConfig, parent_id: str, best: dict, folder: Path) -> None:
    """The winner on the study's run: its config (what final.py reads), trial and score, and its checkpoint as
    an MLflow logged model of the run (the runs table's Models column), the score linked to it."""
    client.log_artifact(parent_id, str(folder / BEST_CONFIG_FILE), BEST_DIR)
    client.set_tag(parent_id, "best_trial", best["trial_id"])
    try:
        model_id = log_winner_model(client, config, parent_id, best, folder)
    except Exception as error:  # e.g. a tracking server older than MLflow 3's logged models: the rest stands
        print(f"warning: the winner's checkpoint could not be logged as an MLflow model: {one_line(error)}")
        model_id = None
    client.log_metric(
        parent_id, f"best_{best['metric']}", best["best_value"], step=best["best_epoch"], model_id=model_id
    )


def log_winner_model(client: MlflowClient, config: StudyConfig, parent_id: str, best: dict, folder: Path) -> str:
    """best_model.pt and best_config.yaml as a logged model named <study>-best, an output of the study's run."""
    experiment_id = client.get_run(parent_id).info.experiment_id
    model = client.create_logged_model(
        experiment_id,
        name=f"{config.name}-best",
        source_run_id=parent_id,
        params={key: str(value) for key, value in best["hyperparameters"].items()},
        tags={STUDY_TAG: config.name, "model": config.model, "trial": best["trial_id"]},
        model_type=config.model,
    )
    client.log_model_artifacts(model.model_id, str(folder))
    client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    client.log_outputs(parent_id, [LoggedModelOutput(model.model_id, best["best_epoch"])])
    return model.model_id
