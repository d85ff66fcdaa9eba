"""The trials' child runs: a Ray Tune callback, run in the driver, mirrors each trial into MLflow.

Kept apart from search.tracking.store, which is plain MLflow, so that scripts which
only read the store (final.py) need not import Ray.
"""

from __future__ import annotations

import time

from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from ray import tune

from search.records.trial_status import TrialStatus
from search.tracking.schema import (
    EPOCH_METRICS,
    NODES_TAG,
    PARENT_TAG,
    RECIPE_TAG,
    STATUS_TAG,
    STUDY_TAG,
    TRIAL_CONFIG,
    TRIAL_ID_TAG,
    TRIAL_LABEL_TAG,
    TUNE_RUN_TAG,
    TrialNames,
    exception_line,
    outcome_name,
    recipe_labels,
    trial_outcome,
)
from search.tracking.store import log_data_input, log_params, mlflow_client, settle_lost_children
from trainables.config import keep_best
from trainables.trainable import NODE_ID


class MlflowTrials(tune.Callback):
    """A Ray Tune callback that mirrors each trial into a child run of the study's run.

    A child run is named by the trial's number (t00, t01, ...) and, once the trial
    ends, by its outcome too ("t03 pruned"), so the runs table tells them apart at a
    glance; it carries the study's data as its dataset input, its best score so far
    as the metric best_<metric>, the Ray nodes that trained it, and recipe=true where it
    trains the recipe. Ray pickles its callbacks with the study and brings
    them back on resume, so this one keeps only plain data and finds a resumed trial's
    existing child run by tag, rather than opening a duplicate.
    """

    recipe: frozenset[str] = frozenset()
    """A class default for a callback pickled before it had one (Ray restores callbacks as pickled)."""

    def __init__(
        self,
        tracking_uri: str,
        experiment_id: str,
        parent_run_id: str,
        config,
        dataset: dict,
        *,
        names: TrialNames | None = None,
        tune_run: str = "",
        tags: dict[str, str] | None = None,
        recipe: frozenset[str] | None = None,
    ):
        """names: how this Tune run's trials are called (default: t00... from the study's earlier trials on);
        tune_run: which of the study's Tune runs this is ('' for the first search; an extension's or a
        confirmation's folder), so that settling lost runs looks at this run's own; tags: on every child run;
        recipe: the names of the trials that train the recipe (default: the search's t00, where it runs one)."""
        self.tracking_uri, self.experiment_id, self.parent_run_id = tracking_uri, experiment_id, parent_run_id
        self.study, self.metric, self.mode = config.name, config.metric, config.mode
        self.names = names or TrialNames(config.trials, config.trials_before)
        self.tune_run, self.tags = tune_run, tags or {}
        self.recipe = recipe_labels(config.trials, config.runs_recipe) if recipe is None else recipe
        self.dataset = dataset
        """The study's data: the fields of an MLflow Dataset."""
        self.run_ids: dict[str, str] = {}
        self.logged_epochs: dict[str, int] = {}
        """Per trial, the last epoch already in MLflow: a trial resumed from an older
        checkpoint replays (identically) epochs that must not be logged twice."""
        self.best: dict[str, float] = {}
        self.nodes: dict[str, list[str]] = {}
        """Per trial, the Ray nodes it trained on, in order."""
        self._client: MlflowClient | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_client": None, "run_ids": {}, "logged_epochs": {}, "best": {}, "nodes": {}}

    @property
    def client(self):
        if self._client is None:
            self._client = mlflow_client(self.tracking_uri)
        return self._client

    @property
    def best_key(self) -> str:
        return f"best_{self.metric}"

    def label(self, trial) -> str:
        return self.names.of(trial.experiment_tag)

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
        run = runs[0]
        history = self.client.get_metric_history(run.info.run_id, "train_loss")
        self.logged_epochs[trial_id] = max((m.step for m in history), default=0)
        if self.best_key in run.data.metrics:
            self.best[trial_id] = run.data.metrics[self.best_key]
        if run.data.tags.get(NODES_TAG):
            self.nodes[trial_id] = run.data.tags[NODES_TAG].split(",")
        if run.info.status != "RUNNING":  # interrupted earlier, running again now
            label = run.data.tags.get(TRIAL_LABEL_TAG, run.info.run_name)
            self.client.update_run(run.info.run_id, status="RUNNING", name=label)
            self.client.set_tag(run.info.run_id, STATUS_TAG, TrialStatus.RUNNING)
        return run.info.run_id

    def new_child(self, trial) -> str:
        label = self.label(trial)
        run = self.client.create_run(
            self.experiment_id,
            run_name=label,
            tags={
                PARENT_TAG: self.parent_run_id,
                TRIAL_ID_TAG: trial.trial_id,
                TRIAL_LABEL_TAG: label,
                STUDY_TAG: self.study,
                STATUS_TAG: TrialStatus.RUNNING.value,  # create_run keeps a tag as given: the plain word
                **({TUNE_RUN_TAG: self.tune_run} if self.tune_run else {}),
                **({RECIPE_TAG: "true"} if label in self.recipe else {}),
                **self.tags,
            },
        )
        log_params(self.client, run.info.run_id, trial.config)  # for people and the UI
        self.client.log_dict(run.info.run_id, trial.config, TRIAL_CONFIG)  # for final.py --run-id
        log_data_input(self.client, run.info.run_id, self.dataset)
        return run.info.run_id

    def on_trial_start(self, iteration, trials, trial, **info):
        self.child_run(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        stamp, step = int(time.time() * 1000), int(result["epoch"])
        run_id = self.child_run(trial)
        self.note_node(trial.trial_id, run_id, result.get(NODE_ID))
        if step <= self.logged_epochs.get(trial.trial_id, 0):
            return
        metrics = [Metric(key, float(result[key]), stamp, step) for key in EPOCH_METRICS if key in result]
        best = self.improved_best(trial.trial_id, result.get(self.metric))
        if best is not None:
            metrics.append(Metric(self.best_key, best, stamp, step))
        self.client.log_batch(run_id, metrics=metrics)

    def note_node(self, trial_id: str, run_id: str, node: str | None) -> None:
        """The node that trains the trial now, on its run where it is a new one."""
        nodes = self.nodes.setdefault(trial_id, [])
        if node is None or nodes[-1:] == [node]:
            return
        nodes.append(node)
        self.client.set_tag(run_id, NODES_TAG, ",".join(nodes))

    def improved_best(self, trial_id: str, score: float | None) -> float | None:
        """The trial's new best score, or None where this one is no better (or no number)."""
        return self.best[trial_id] if keep_best(self.best, trial_id, score, self.mode) else None

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.finish(trial, trial_outcome(trial.last_result, error=False))

    def on_trial_error(self, iteration, trials, trial, **info):
        self.finish(trial, TrialStatus.FAILED, cause=exception_line(trial.error_file))

    def on_experiment_end(self, trials, **info):
        try:
            settle_lost_children(
                self.client, self.experiment_id, self.parent_run_id, {t.trial_id for t in trials}, self.tune_run
            )
        except Exception as error:  # tidying the record must not fail a study whose trials are done
            print(f"warning: could not settle the runs of trials lost before resuming: {error}", flush=True)

    def finish(self, trial, outcome: TrialStatus, cause: str | None = None) -> None:
        run_id = self.child_run(trial)
        self.client.set_tag(run_id, STATUS_TAG, outcome)
        if cause:
            self.client.set_tag(run_id, "failure", cause)
        self.client.update_run(run_id, name=outcome_name(self.label(trial), outcome))
        self.client.set_terminated(run_id, "FAILED" if outcome == TrialStatus.FAILED else "FINISHED")
