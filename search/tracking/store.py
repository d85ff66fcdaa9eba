"""MLflow, written from the driver only (one writer per study).

The store is checked before a study does any long work (a bad address fails in
seconds, in one line) and created under a file lock, so that studies started
together can share a new SQLite store. One parent run per study; one child run per
trial nested under it, with params, per-epoch metrics (step = epoch) and a final
status tag: completed, pruned or failed.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock
from mlflow.entities import Dataset, DatasetInput, InputTag, Param, ViewType
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from search.cli import interrupts_ignored
from search.errors import UsageError, one_line
from search.records.trial_status import TrialStatus
from search.tracking.schema import (
    EXPERIMENT_KIND_TAG,
    FINAL_ROLE,
    PARENT_TAG,
    ROLE_TAG,
    SERVER_TIMEOUT_S,
    STATUS_TAG,
    STUDY_TAG,
    TRAINING_KIND,
    TRIAL_ID_TAG,
    TRIAL_LABEL_TAG,
    TUNE_RUN_TAG,
    check_store_uri,
    outcome_name,
    sqlite_path,
    store_exists,
)


def mlflow_client(tracking_uri: str, *, create: bool = True) -> MlflowClient:
    """A client on a tracking store that answers, or a one-line UsageError that says why not.

    A new SQLite store gets its tables here, under a file lock beside it: MLflow's schema
    migrations are not safe to run twice at once, and two studies that open a new store
    together would otherwise leave it half-migrated for good. With create=False a store
    that does not exist yet is an error (reading must not create one). A server that does
    not answer is an error within seconds rather than after MLflow's minutes of retries.
    """
    if not create and not store_exists(tracking_uri):
        raise UsageError(
            f"no MLflow store at {sqlite_path(tracking_uri)}: run a study first (python search/run.py ...), "
            f"or pass --tracking-uri of the store that holds it"
        )
    check_store_uri(tracking_uri)
    # Ctrl-C waits for a migration: one stopped half-way leaves the store unusable.
    with store_lock(tracking_uri), no_http_retries(SERVER_TIMEOUT_S), interrupts_ignored():
        client = MlflowClient(tracking_uri)
        try:  # the first calls create or migrate the tracking and registry tables
            client.search_experiments(max_results=1)
            client.search_registered_models(max_results=1)
        except Exception as error:  # MLflow and SQLAlchemy raise many types; the first line says which
            raise UsageError(f"cannot open the MLflow store --tracking-uri {tracking_uri}: {one_line(error)}") from None
    return client


@contextmanager
def store_lock(tracking_uri: str) -> Iterator[None]:
    """Held while a SQLite store is created or migrated; other stores need none."""
    if not tracking_uri.startswith("sqlite:///"):
        yield
        return
    path = sqlite_path(tracking_uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{path}.lock"):
        yield


@contextmanager
def no_http_retries(seconds: int) -> Iterator[None]:
    """MLflow's HTTP client without its retries, for a first call that only checks the server answers."""
    keys = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(seconds)}
    saved = {key: os.environ.get(key) for key in keys}
    os.environ.update(keys)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def all_runs(client, filter_string: str) -> list:
    """Runs of every active experiment matching filter_string, newest first."""
    experiment_ids = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ACTIVE_ONLY)]
    if not experiment_ids:
        return []
    return list(
        client.search_runs(experiment_ids, filter_string, max_results=50_000, order_by=["attributes.start_time DESC"])
    )


def is_study_run(run) -> bool:
    """A study's parent run: tagged with a study, not a trial, not a final retrain."""
    tags = run.data.tags
    return STUDY_TAG in tags and PARENT_TAG not in tags and tags.get(ROLE_TAG) != FINAL_ROLE


def quoted(value: str) -> str:
    quote = "'" if "'" not in value else '"'
    return f"{quote}{value}{quote}"


def study_runs(client, name: str) -> list:
    """The parent runs of studies named `name`, newest first."""
    return [run for run in all_runs(client, f"tags.{STUDY_TAG} = {quoted(name)}") if is_study_run(run)]


def default_artifact_root(tracking_uri: str) -> str | None:
    """Artifacts beside a SQLite store (mlflow/artifacts), not in the working directory."""
    if tracking_uri.startswith("sqlite:///"):
        return (sqlite_path(tracking_uri).resolve().parent / "artifacts").as_uri()
    return None


def get_or_create_experiment(client, name: str, tracking_uri: str) -> str:
    """The experiment's id; a new one keeps its artifacts beside a SQLite store and opens on MLflow's training view."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        return client.create_experiment(
            name, artifact_location=default_artifact_root(tracking_uri), tags={EXPERIMENT_KIND_TAG: TRAINING_KIND}
        )
    if EXPERIMENT_KIND_TAG not in experiment.tags:  # made by an older version, or inferred by the UI later
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, TRAINING_KIND)
    return experiment.experiment_id


def log_data_input(client, run_id: str, dataset: dict, context: str = "train") -> None:
    """The data as the run's MLflow dataset input (the runs table's Dataset column); `dataset`: Dataset's fields,
    `context`: what the run did with it (train; a final run's test too)."""
    tags = [InputTag(MLFLOW_DATASET_CONTEXT, context)]
    client.log_inputs(run_id, datasets=[DatasetInput(Dataset(**dataset), tags)])


def log_params(client, run_id: str, params: dict) -> None:
    client.log_batch(run_id, params=[Param(str(k), str(v)) for k, v in sorted(params.items())])


def settle_lost_children(
    client, experiment_id: str, parent_run_id: str, trial_ids: set[str], tune_run: str = ""
) -> None:
    """Child runs of trials that Ray never saved, found when a resumed study ends.

    A study killed outright (kill -9, power loss) between a trial's start and Ray's next
    snapshot of the experiment leaves a child run for a trial that the resumed study
    does not know: Ray draws that trial afresh. Such a run with no epoch logged records
    nothing and is deleted (MLflow keeps it restorable until `mlflow gc`); one with
    epochs is kept, KILLED, with trial_status 'lost'. Only the runs of the Tune run `tune_run` are looked at
    (an extended study's earlier searches, and its confirmations, are Tune runs of their own).
    """
    children = client.search_runs([experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'")
    for run in children:
        if run.data.tags.get(TRIAL_ID_TAG) in trial_ids or run.data.tags.get(TUNE_RUN_TAG, "") != tune_run:
            continue
        if not run.data.metrics:
            client.delete_run(run.info.run_id)
        else:
            end_trial_run(client, run, TrialStatus.LOST)


def close_open_children(client, experiment_id: str, parent_run_id: str) -> None:
    """Mark trials still RUNNING when the study ends (interrupted) as KILLED, never left open."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}' and attributes.status = 'RUNNING'",
    )
    for run in runs:
        end_trial_run(client, run, TrialStatus.INTERRUPTED)


def end_trial_run(client, run, outcome: TrialStatus) -> None:
    """A trial's run that did not end by itself: KILLED, its outcome in its tag and its name."""
    client.set_tag(run.info.run_id, STATUS_TAG, outcome)
    if TRIAL_LABEL_TAG in run.data.tags:
        client.update_run(run.info.run_id, name=outcome_name(run.data.tags[TRIAL_LABEL_TAG], outcome))
    client.set_terminated(run.info.run_id, "KILLED")


def read_artifact(client: MlflowClient, run_id: str, path: str) -> str | None:
    """An artifact of a run as text, or None where the run has no such file."""
    folder = path.rpartition("/")[0]
    if not any(item.path == path for item in client.list_artifacts(run_id, folder or None)):
        return None
    with tempfile.TemporaryDirectory() as directory:
        return Path(client.download_artifacts(run_id, path, directory)).read_text(encoding="utf-8")
