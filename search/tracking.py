"""MLflow, written from the driver only (one writer, so SQLite is safe).

One parent run per study; one child run per trial nested under it, with params,
per-epoch metrics (step = epoch) and a final status tag: completed, pruned or failed.
"""

from __future__ import annotations

from pathlib import Path

from trainables.config import METRIC_MODES

EPOCH_METRICS = ("train_loss", *METRIC_MODES, "lr")
STATUS_TAG = "trial_status"
TRIAL_ID_TAG = "ray_trial_id"
STUDY_TAG = "study"
PARENT_TAG = "mlflow.parentRunId"
# Tags that mark a final retrain's run: it carries the study's tag too, but is no study.
ROLE_TAG, FINAL_ROLE = "role", "final"


def mlflow_client(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    prepare_store(tracking_uri)
    return MlflowClient(tracking_uri)


def store_exists(tracking_uri: str) -> bool:
    """False for a SQLite store whose file is missing (reading must not create it)."""
    if tracking_uri.startswith("sqlite:///"):
        return Path(tracking_uri.removeprefix("sqlite:///")).expanduser().is_file()
    return True


def all_runs(client, filter_string: str) -> list:
    """Runs of every active experiment matching filter_string, newest first."""
    from mlflow.entities import ViewType

    experiment_ids = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ACTIVE_ONLY)]
    if not experiment_ids:
        return []
    return list(client.search_runs(experiment_ids, filter_string, max_results=50_000, order_by=["attributes.start_time DESC"]))


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


def prepare_store(tracking_uri: str) -> None:
    """SQLite stores need their folder to exist before MLflow opens the file."""
    if tracking_uri.startswith("sqlite:///"):
        Path(tracking_uri.removeprefix("sqlite:///")).expanduser().parent.mkdir(parents=True, exist_ok=True)


def default_artifact_root(tracking_uri: str) -> str | None:
    """Artifacts beside a SQLite store (mlflow/artifacts), not in the working directory."""
    if tracking_uri.startswith("sqlite:///"):
        database = Path(tracking_uri.removeprefix("sqlite:///")).expanduser().resolve()
        return (database.parent / "artifacts").as_uri()
    return None


def get_or_create_experiment(client, name: str, tracking_uri: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(name, artifact_location=default_artifact_root(tracking_uri))


def trial_outcome(result: dict | None, error: bool) -> str:
    """completed, pruned or failed: how a trial ended, from its last result.

    The trainable marks its last epoch with finished=True (budget spent or early
    stopping). A trial whose last result lacks it was stopped from outside: by ASHA.
    """
    if error:
        return "failed"
    if result and result.get("finished"):
        return "completed"
    return "pruned"


def log_params(client, run_id: str, params: dict) -> None:
    from mlflow.entities import Param

    client.log_batch(run_id, params=[Param(str(k), str(v)) for k, v in sorted(params.items())])


def first_line(error_file: str | None) -> str:
    """The last line of a trial's traceback, which names the exception."""
    try:
        lines = [line for line in Path(error_file).read_text().splitlines() if line.strip()]
    except (OSError, TypeError):
        return "unknown error"
    return lines[-1][:500] if lines else "unknown error"


def settle_lost_children(client, experiment_id: str, parent_run_id: str, trial_ids: set[str]) -> None:
    """Child runs of trials that Ray never saved, found when a resumed study ends.

    A study killed outright (kill -9, power loss) between a trial's start and Ray's next
    snapshot of the experiment leaves a child run for a trial that the resumed study
    does not know: Ray draws that trial afresh. Such a run with no epoch logged records
    nothing and is deleted (MLflow keeps it restorable until `mlflow gc`); one with
    epochs is kept, KILLED, with trial_status 'lost'.
    """
    children = client.search_runs([experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'")
    for run in children:
        if run.data.tags.get(TRIAL_ID_TAG) in trial_ids:
            continue
        if not run.data.metrics:
            client.delete_run(run.info.run_id)
        else:
            client.set_tag(run.info.run_id, STATUS_TAG, "lost")
            client.set_terminated(run.info.run_id, "KILLED")


def close_open_children(client, experiment_id: str, parent_run_id: str) -> None:
    """Mark trials still RUNNING when the study ends (interrupted) as KILLED, never left open."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}' and attributes.status = 'RUNNING'",
    )
    for run in runs:
        client.set_tag(run.info.run_id, STATUS_TAG, "interrupted")
        client.set_terminated(run.info.run_id, "KILLED")
