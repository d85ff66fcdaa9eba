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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import optuna
import yaml
from mlflow.entities import LoggedModelOutput, LoggedModelStatus, Metric, Param
from mlflow.tracking import MlflowClient

from search.errors import UsageError, one_line
from search.records.study_config import CONFIG_FILE, ConfigError, StudyConfig
from search.records.trial_status import TrialStatus
from search.records.winner import Winner, WinnerRefused
from search.tracking.claim import being_run, name_taken
from search.tracking.optuna_store import existing_optuna_storage, holds, open_optuna_storage
from search.tracking.runs_view import runs_view, save_runs_view
from search.tracking.schema import (
    BEST_CONFIG,
    BEST_CONFIG_FILE,
    BEST_DIR,
    DATA_SUMMARY,
    LEAKS_FILE,
    PARENT_TAG,
    ROLE_TAG,
    SPLIT_FILE,
    STATUS_TAG,
    STUDY_TAG,
    TRIAL_ID_TAG,
    TRIAL_LABEL_TAG,
    outcome_name,
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
from trainables.data import SPLITS, DatasetIndex, data_digest, is_manifest, manifest_digest
from trainables.leakage import MIN_CORRELATION, NEAR_BITS
from trainables.privacy import patient_hashes, patient_salt

SKIPPED_FILE = "skipped_images.txt"
"""The study's images that would not decode (left out of split.json's train and val), one key a line."""


class FoundLeaks(Protocol):
    """What the leakage check found, as the study's run records it (search.study.leaks.LeakReport: the check is
    the study's, the record is the store's)."""

    @property
    def duplicates(self) -> Sequence[object]:
        """Every duplicate pair across splits."""
        ...

    def counts(self) -> dict[str, int]:
        """leak_<kind>_<split>_<split>: the run's metrics, zeros included."""
        ...

    def table(self) -> str:
        """leakage.csv: every pair found."""
        ...


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


def claim_optuna_study(config: StudyConfig) -> bool:
    """A new study's Optuna study, created now, just before its MLflow run opens: the database's unique study name
    claims the study's name where no lock file can (an Optuna database shared across machines, search.tracking.claim).
    Ray's OptunaSearch then loads it (create_study with load_if_exists). Whether it was created (False: no
    --optuna-storage); a one-line UsageError where another process created it first."""
    if config.optuna_storage is None:
        return False
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # not "A new study created in RDB"
    direction = {"min": optuna.study.StudyDirection.MINIMIZE, "max": optuna.study.StudyDirection.MAXIMIZE}
    _, modes = config.objectives  # as the study's searcher creates it (tuning.make_searcher)
    try:
        storage = open_optuna_storage(config.optuna_storage)
        storage.create_new_study([direction[mode] for mode in modes], config.name)
    except optuna.exceptions.DuplicatedStudyError:
        raise UsageError(being_run(config.name, "")) from None
    return True


def drop_optuna_study(config: StudyConfig) -> None:
    """Undo claim_optuna_study where the study's MLflow run did not open: nothing half-written stays."""
    assert config.optuna_storage is not None, "claimed in a database"
    optuna.delete_study(study_name=config.name, storage=open_optuna_storage(config.optuna_storage))


def open_parent_run(
    client: MlflowClient,
    config: StudyConfig,
    index: DatasetIndex,
    dataset: dict,
    skipped: list[str],
    knobs: list[str],
    *,
    leaks: FoundLeaks | None = None,
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
    save_runs_view(client, experiment_id, config, runs_view(config, knobs))
    if skipped:
        client.log_metric(parent_id, "skipped_images", len(skipped))
        client.log_text(parent_id, "\n".join(skipped), SKIPPED_FILE)
    if leaks is not None:
        log_leaks(client, parent_id, leaks)
    return experiment_id, parent_id


def split_record(index: DatasetIndex, seed: int) -> dict:
    """split.json: which images, and which patients, each split holds. Patients as salted hashes only
    (trainables.privacy), sorted by hash; params show their counts."""
    record: dict = {"source": index.source, "seed": seed}
    if index.is_manifest:
        record["manifest_digest"] = manifest_digest(index.source)
    salt = patient_salt() if index.has_groups else b""
    for split in SPLITS:
        record[split] = {"images": [sample.key for sample in index.splits.get(split, [])]}
        if index.has_groups:
            record[split]["groups"] = patient_hashes(index.groups(split), salt)
    return record


@dataclass(frozen=True)
class SplitRecord:
    """A study's split.json read back (`read_split_record`): which images each split held, as the study used them."""

    study: str
    """The study's name, for messages."""
    source: str
    """The data source the study indexed ('synthetic', a folder, a manifest)."""
    seed: int
    manifest_digest: str | None
    """The manifest's digest when the study ran (None for other sources)."""
    images: dict[str, list[str]]
    """train, val and test: each split's image keys, in the study's order (after --smoke's subsample, without the
    train and val images that would not decode)."""
    skipped: frozenset[str] = frozenset()
    """The images the study left out because they would not decode."""

    def split_of(self) -> dict[str, str]:
        """Each recorded image's split."""
        return {key: split for split in SPLITS for key in self.images[split]}

    def manifest_change(self, source: str) -> str | None:
        """'manifest M changed since study S ran (digest a -> b)' where the manifest's digest differs from the
        record's; None where it does not, or the source is no manifest."""
        if self.manifest_digest is None or not is_manifest(source) or not Path(source).is_file():
            return None
        now = manifest_digest(source)
        if now == self.manifest_digest:
            return None
        return f"manifest {source} changed since study {self.study!r} ran (digest {self.manifest_digest} -> {now})"


def read_split_record(client: MlflowClient, run) -> SplitRecord | None:
    """The split.json of a study's parent run (with the images it could not decode); None for a study that
    predates the record. The one reader of what `split_record` writes."""
    name = run.data.tags.get(STUDY_TAG, run.info.run_id)
    text = read_artifact(client, run.info.run_id, SPLIT_FILE)
    if text is None:
        return None
    try:
        record = json.loads(text)
        images = {split: [str(key) for key in record[split]["images"]] for split in SPLITS}
        digest = record.get("manifest_digest")
        seed = int(record["seed"])
        source = str(record["source"])
    except (ValueError, KeyError, TypeError, AttributeError):
        raise UsageError(
            f"the {SPLIT_FILE} of study {name!r} is not the record a study writes (edited by hand?): put back the one "
            f"the study logged, or start a new study"
        ) from None
    skipped = read_artifact(client, run.info.run_id, SKIPPED_FILE) or ""
    digest = None if digest is None else str(digest)
    return SplitRecord(name, source, seed, digest, images, frozenset(filter(None, skipped.splitlines())))


def log_leaks(client: MlflowClient, parent_id: str, leaks: FoundLeaks) -> None:
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


LEAK_METRIC_PREFIX = "leak_"
"""The leakage check's metrics on a study's run: leak_<kind>_<split>_<split> (log_leaks)."""


@dataclass(frozen=True)
class StudyLeaks:
    """The leakage check's result as a study's run recorded it (log_leaks), read back by `read_study_leaks`."""

    study_run_id: str
    counts: dict[str, int]
    """Duplicate pairs per kind and pair of splits (leak_exact_train_test, ...), zeros included; empty where the
    study predates the check."""


def read_study_leaks(run) -> StudyLeaks:
    """The leak_* metrics of a study's parent run: the one reader of what log_leaks writes."""
    metrics = run.data.metrics
    counts = {key: int(value) for key, value in metrics.items() if key.startswith(LEAK_METRIC_PREFIX)}
    return StudyLeaks(run.info.run_id, counts)


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


def has_best_config(client: MlflowClient, run_id: str) -> bool:
    """Whether a study's parent run holds its winner's best_config.yaml."""
    return any(item.path == BEST_CONFIG for item in client.list_artifacts(run_id, BEST_DIR))


def read_best_config(client: MlflowClient, parent, requested_model: str | None = None) -> Winner:
    """The study's winner, as its parent run's best_config.yaml records it; a one-line UsageError for a file that
    is no winner's record (or for another model than `requested_model`)."""
    name = parent.data.tags[STUDY_TAG]
    text = read_artifact(client, parent.info.run_id, BEST_CONFIG) or ""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError:
        raise UsageError(f"the {BEST_CONFIG} of study {name!r} is not valid YAML") from None
    try:
        return Winner.from_dict(
            raw, f"study {name}", requested_model, experiment_id=parent.info.experiment_id, run_id=parent.info.run_id
        )
    except WinnerRefused as error:
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


WINNER_SUFFIX = ", best"
"""Added to the winning trial's run name ("t07 completed, best"): the runs table shows names first."""


def log_best(client: MlflowClient, config: StudyConfig, parent_id: str, best: Winner, folder: Path) -> None:
    """The winner on the study's run: its config (what final.py reads), trial (t07, and Ray's id) and score, and
    its checkpoint as an MLflow logged model of the run (the runs table's Models column), the score linked to it;
    its trial's run named as the winner."""
    value, epoch = best.best_value, best.best_epoch
    assert value is not None and epoch is not None  # a study's winner: scored by its trial (Winner.from_trial)
    client.log_artifact(parent_id, str(folder / BEST_CONFIG_FILE), BEST_DIR)
    client.set_tag(parent_id, "best_trial", best.trial_or_id)  # t07; Ray's id beside it
    client.set_tag(parent_id, "best_trial_id", best.trial_id)
    name_the_winner(client, parent_id, best)
    try:
        model_id = log_winner_model(client, config, parent_id, best, folder, epoch)
    except Exception as error:  # e.g. a tracking server older than MLflow 3's logged models: the rest stands
        print(f"warning: the winner's checkpoint could not be logged as an MLflow model: {one_line(error)}")
        model_id = None
    client.log_metric(parent_id, f"best_{best.metric}", value, step=epoch, model_id=model_id)


def name_the_winner(client: MlflowClient, parent_id: str, best: Winner) -> None:
    """The winning search trial's run named "t07 completed, best" (a confirmed winner's search trial, not its
    retrain); a run that had the name from an earlier winner (an extended study's) gets its plain name back."""
    experiment_id = client.get_run(parent_id).info.experiment_id
    runs = client.search_runs([experiment_id], f"tags.`{PARENT_TAG}` = '{parent_id}'", max_results=50_000)
    for run in runs:
        tags = run.data.tags
        if ROLE_TAG in tags or TRIAL_LABEL_TAG not in tags or STATUS_TAG not in tags:
            continue  # a confirmation's retrain, or a run that never started
        won = tags[STATUS_TAG] != TrialStatus.LOST and (
            tags[TRIAL_LABEL_TAG] == best.trial if best.trial else tags.get(TRIAL_ID_TAG) == best.trial_id
        )
        name = outcome_name(tags[TRIAL_LABEL_TAG], tags[STATUS_TAG]) + (WINNER_SUFFIX if won else "")
        if won or run.info.run_name.endswith(WINNER_SUFFIX):
            client.update_run(run.info.run_id, name=name)


def log_winner_model(
    client: MlflowClient, config: StudyConfig, parent_id: str, best: Winner, folder: Path, epoch: int
) -> str:
    """best_model.pt and best_config.yaml as a logged model named <study>-best, an output of the study's run at
    the winner's best epoch."""
    experiment_id = client.get_run(parent_id).info.experiment_id
    model = client.create_logged_model(
        experiment_id,
        name=f"{config.name}-best",
        source_run_id=parent_id,
        params={key: str(value) for key, value in best.hyperparameters.to_dict().items()},
        tags={STUDY_TAG: config.name, "model": config.model, "trial": best.trial_or_id},
        model_type=config.model,
    )
    client.log_model_artifacts(model.model_id, str(folder))
    client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    client.log_outputs(parent_id, [LoggedModelOutput(model.model_id, epoch)])
    return model.model_id
