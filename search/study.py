"""One study: Optuna TPE proposes, ASHA stops, Ray Tune runs trials in GPU slots."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.trial import TrialState
from ray import tune
from ray.tune import ExperimentAnalysis
from ray.tune.experiment import Trial
from ray.tune.logger import JsonLoggerCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from search.spaces import Space
from search.callbacks import EpochPrinter
from search.tracking import trial_outcome
from trainables.config import METRIC_MODES
from trainables.trainable import TrialSetup, train_trial

OPTUNA_STATES = {"completed": TrialState.COMPLETE, "pruned": TrialState.PRUNED, "failed": TrialState.FAIL}


class PruneAwareOptunaSearch(OptunaSearch):
    """OptunaSearch that tells Optuna how a trial really ended.

    Ray's OptunaSearch tells an ASHA-stopped trial as COMPLETE with its early score,
    feeding TPE one-epoch results as if final, and a crashed trial that reported
    anything as COMPLETE too. Here: finished trials are COMPLETE with their best
    score, ASHA-stopped ones PRUNED, crashed ones FAIL.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._best_scores: dict[str, float] = {}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self._remember(trial_id, result)
        super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        self._remember(trial_id, result)
        state = OPTUNA_STATES[trial_outcome(result, error)]
        value = self._best_scores.get(trial_id) if state == TrialState.COMPLETE else None
        if state == TrialState.COMPLETE and value is None:
            state = TrialState.FAIL  # finished without a usable score
        self._ot_study.tell(self._ot_trials[trial_id], value, state=state)
        self._completed_trials.add(trial_id)

    def _remember(self, trial_id: str, result: dict | None) -> None:
        score = (result or {}).get(self.metric)
        if score is None or score != score:  # missing or NaN
            return
        best = self._best_scores.get(trial_id)
        better = max if self.mode == "max" else min
        self._best_scores[trial_id] = score if best is None else better(best, score)

    @property
    def study(self) -> optuna.Study:
        return self._ot_study


@dataclass(frozen=True)
class StudyPlan:
    """How the study runs, resolved from the command line."""

    name: str
    trials: int
    metric: str
    seed: int
    grace_period: int
    reduction_factor: int
    gpus_per_trial: float
    cpus_per_trial: int
    max_concurrent: int
    storage_path: str
    max_failures: int = 0


def make_searcher(space: Space, plan: StudyPlan) -> PruneAwareOptunaSearch:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=plan.seed)
    return PruneAwareOptunaSearch(space=space.sample, metric=plan.metric, mode=METRIC_MODES[plan.metric], sampler=sampler)


def make_trainable(setup: TrialSetup, plan: StudyPlan):
    return tune.with_resources(
        tune.with_parameters(train_trial, setup=setup),
        {"cpu": plan.cpus_per_trial, "gpu": plan.gpus_per_trial},
    )


def restore_tuner(space: Space, setup: TrialSetup, plan: StudyPlan) -> tune.Tuner:
    """Continue an interrupted study: finished trials kept, unfinished ones from their last checkpoint.

    Ray restores the searcher (with its Optuna study), the scheduler and the callbacks
    as they were pickled; only the trainable, which holds this process's data paths,
    is given anew.
    """
    path = str(Path(plan.storage_path) / plan.name)
    return tune.Tuner.restore(path, trainable=make_trainable(setup, plan), resume_unfinished=True, resume_errored=False)


def unfinished_trials(plan: StudyPlan) -> int:
    """Trials of the study not yet ended, by Ray's last snapshot of the experiment.

    That snapshot is what --resume restores. On Ctrl-C Ray takes it before it stops the
    running trials, and then marks its in-memory copies of them TERMINATED, so the
    ResultGrid's counts would take an interrupted last wave for a finished study.
    """
    try:
        trials = ExperimentAnalysis(str(Path(plan.storage_path) / plan.name)).trials
    except ValueError:  # no snapshot at all: nothing is recorded as ended
        return plan.trials
    return plan.trials - sum(trial.status in (Trial.TERMINATED, Trial.ERROR) for trial in trials)


def make_tuner(space: Space, setup: TrialSetup, plan: StudyPlan, callbacks: list, trainable=None) -> tune.Tuner:
    """The study's Tuner; `trainable` replaces make_trainable(setup, plan) (benchmarks inject a fixed-cost one)."""
    mode = METRIC_MODES[plan.metric]
    scheduler = ASHAScheduler(
        time_attr="epoch",
        max_t=setup.epochs,
        grace_period=min(plan.grace_period, setup.epochs),
        reduction_factor=plan.reduction_factor,
    )
    return tune.Tuner(
        trainable if trainable is not None else make_trainable(setup, plan),
        tune_config=tune.TuneConfig(
            metric=plan.metric,
            mode=mode,
            search_alg=make_searcher(space, plan),
            scheduler=scheduler,
            num_samples=plan.trials,
            max_concurrent_trials=plan.max_concurrent,
            # Keep worker processes (with torch and timm imported) from trial to trial.
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=plan.name,
            storage_path=str(Path(plan.storage_path).resolve()),
            # result.json per trial (what Tune reads back); MLflow is the record, not CSV or TensorBoard.
            callbacks=[JsonLoggerCallback(), EpochPrinter(setup.epochs, plan.metric), *callbacks],
            # The best checkpoint for the study, the latest for resuming: Ray keeps both.
            checkpoint_config=tune.CheckpointConfig(
                num_to_keep=1, checkpoint_score_attribute=plan.metric, checkpoint_score_order=mode
            ),
            # A crashed trial is retried from its last checkpoint this many times, then failed.
            failure_config=tune.FailureConfig(max_failures=plan.max_failures),
            verbose=0,  # EpochPrinter says what happens, one line per event
        ),
    )
