"""The trials' child runs: a Ray Tune callback, run in the driver, mirrors each trial into MLflow.

Kept apart from search.tracking.store, which is plain MLflow, so that scripts which
only read the store (final.py) need not import Ray.
"""

from __future__ import annotations

import time

from mlflow.entities import Metric
from ray import tune

from search.tracking.schema import (
    EPOCH_METRICS,
    PARENT_TAG,
    STATUS_TAG,
    STUDY_TAG,
    TRIAL_CONFIG,
    TRIAL_ID_TAG,
    exception_line,
    trial_outcome,
)
from search.tracking.store import log_params, mlflow_client, settle_lost_children


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
            filter_string=f"tags.`{PARENT_TAG}` = '{self.parent_run_id}' and tags.{TRIAL_ID_TAG} = '{trial_id}'",
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
                PARENT_TAG: self.parent_run_id,
                TRIAL_ID_TAG: trial.trial_id,
                STUDY_TAG: self.study,
                STATUS_TAG: "running",
            },
        )
        log_params(self.client, run.info.run_id, trial.config)  # for people and the UI
        self.client.log_dict(run.info.run_id, trial.config, TRIAL_CONFIG)  # for final.py --run-id
        return run.info.run_id

    def on_trial_start(self, iteration, trials, trial, **info):
        self.child_run(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        stamp, step = int(time.time() * 1000), int(result["epoch"])
        run_id = self.child_run(trial)
        if step <= self.logged_epochs.get(trial.trial_id, 0):
            return
        metrics = [Metric(key, float(result[key]), stamp, step) for key in EPOCH_METRICS if key in result]
        self.client.log_batch(run_id, metrics=metrics)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.finish(trial, trial_outcome(trial.last_result, error=False))

    def on_trial_error(self, iteration, trials, trial, **info):
        self.finish(trial, "failed", cause=exception_line(trial.error_file))

    def on_experiment_end(self, trials, **info):
        try:
            settle_lost_children(self.client, self.experiment_id, self.parent_run_id, {t.trial_id for t in trials})
        except Exception as error:  # tidying the record must not fail a study whose trials are done
            print(f"warning: could not settle the runs of trials lost before resuming: {error}", flush=True)

    def finish(self, trial, outcome: str, cause: str | None = None) -> None:
        run_id = self.child_run(trial)
        self.client.set_tag(run_id, STATUS_TAG, outcome)
        if cause:
            self.client.set_tag(run_id, "failure", cause)
        self.client.set_terminated(run_id, "FAILED" if outcome == "failed" else "FINISHED")
