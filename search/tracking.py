"""MLflow, written from the driver only (one writer, so SQLite is safe).

One parent run per study; one child run per trial nested under it, with params,
per-epoch metrics (step = epoch) and a final status tag: completed, pruned or failed.
"""

from __future__ import annotations

import time
from pathlib import Path

from ray import tune

from trainables.config import METRIC_MODES

EPOCH_METRICS = ("train_loss", *METRIC_MODES, "lr")
STATUS_TAG = "trial_status"
TRIAL_ID_TAG = "ray_trial_id"
STUDY_TAG = "study"


def mlflow_client(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    prepare_store(tracking_uri)
    return MlflowClient(tracking_uri)


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


class MlflowTrials(tune.Callback):
    """A Ray Tune callback that mirrors each trial into a child run of the study's run.

    Ray pickles its callbacks with the study and brings them back on resume, so this
    one keeps only plain data and finds a resumed trial's existing child run by tag,
    rather than opening a duplicate.
    """

    def __init__(self, tracking_uri: str, experiment_id: str, parent_run_id: str, study: str):
        self.tracking_uri, self.experiment_id = tracking_uri, experiment_id
        self.parent_run_id, self.study = parent_run_id, study
        self.run_ids: dict[str, str] = {}
        self.logged_epochs: dict[str, int] = {}
        """Per trial, the last epoch already in MLflow: a trial resumed from an older
        checkpoint replays (identically) epochs that must not be logged twice."""
        self._client = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_client": None, "run_ids": {}, "logged_epochs": {}}

    @property
    def client(self):
        if self._client is None:
            self._client = mlflow_client(self.tracking_uri)
        return self._client

    def child_run(self, trial) -> str:
        if trial.trial_id not in self.run_ids:
            self.run_ids[trial.trial_id] = self.existing_child(trial.trial_id) or self.new_child(trial)
        return self.run_ids[trial.trial_id]

    def existing_child(self, trial_id: str) -> str | None:
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`mlflow.parentRunId` = '{self.parent_run_id}' and tags.{TRIAL_ID_TAG} = '{trial_id}'",
        )
        if not runs:
            return None
        run_id = runs[0].info.run_id
        history = self.client.get_metric_history(run_id, "train_loss")
        self.logged_epochs[trial_id] = max((m.step for m in history), default=0)
        if runs[0].info.status != "RUNNING":  # interrupted earlier, running again now
            self.client.update_run(run_id, status="RUNNING")
            self.client.set_tag(run_id, STATUS_TAG, "running")
        return run_id

    def new_child(self, trial) -> str:
        run = self.client.create_run(
            self.experiment_id,
            run_name=f"{self.study}-{trial.trial_id}",
            tags={
                "mlflow.parentRunId": self.parent_run_id,
                TRIAL_ID_TAG: trial.trial_id,
                STUDY_TAG: self.study,
                STATUS_TAG: "running",
            },
        )
        log_params(self.client, run.info.run_id, trial.config)
        return run.info.run_id

    def on_trial_start(self, iteration, trials, trial, **info):
        self.child_run(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        from mlflow.entities import Metric

        stamp, step = int(time.time() * 1000), int(result["epoch"])
        run_id = self.child_run(trial)
        if step <= self.logged_epochs.get(trial.trial_id, 0):
            return
        metrics = [Metric(key, float(result[key]), stamp, step) for key in EPOCH_METRICS if key in result]
        self.client.log_batch(run_id, metrics=metrics)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.finish(trial, trial_outcome(trial.last_result, error=False))

    def on_trial_error(self, iteration, trials, trial, **info):
        self.finish(trial, "failed", cause=first_line(trial.error_file))

    def finish(self, trial, outcome: str, cause: str | None = None) -> None:
        run_id = self.child_run(trial)
        self.client.set_tag(run_id, STATUS_TAG, outcome)
        if cause:
            self.client.set_tag(run_id, "failure", cause)
        self.client.set_terminated(run_id, "FAILED" if outcome == "failed" else "FINISHED")


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


def close_open_children(client, experiment_id: str, parent_run_id: str) -> None:
    """Mark trials still RUNNING when the study ends (interrupted) as KILLED, never left open."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}' and attributes.status = 'RUNNING'",
    )
    for run in runs:
        client.set_tag(run.info.run_id, STATUS_TAG, "interrupted")
        client.set_terminated(run.info.run_id, "KILLED")
