"""The Tune wiring of a study: Optuna TPE proposes, ASHA stops, Ray Tune runs trials in GPU slots."""

from __future__ import annotations

import warnings

import optuna
from optuna.trial import TrialState
from ray import tune
from ray.tune import ExperimentAnalysis
from ray.tune.experiment import Trial
from ray.tune.logger import JsonLoggerCallback
from ray.tune.result import TRAINING_ITERATION
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from search.study.config import StudyConfig
from search.study.console import EpochPrinter
from search.study.spaces import Space
from search.tracking.optuna_store import open_optuna_storage
from search.tracking.schema import TRIAL_ID_TAG, trial_outcome
from trainables.config import improves
from trainables.data import CachedSplit
from trainables.engine import SpeedOptions
from trainables.spec import ModelSpec
from trainables.trainable import TrialSetup, train_trial

OPTUNA_STATES = {"completed": TrialState.COMPLETE, "pruned": TrialState.PRUNED, "failed": TrialState.FAIL}


class PruneAwareOptunaSearch(OptunaSearch):
    """OptunaSearch that tells Optuna how a trial really ended, once.

    Ray's OptunaSearch tells an ASHA-stopped trial as COMPLETE with its early score,
    feeding TPE one-epoch results as if final, and a crashed trial that reported
    anything as COMPLETE too. Here: finished trials are COMPLETE with their best
    score, ASHA-stopped ones PRUNED, crashed ones FAIL.

    With a database storage, a resumed study's searcher comes from Ray's last snapshot,
    which can predate what the database holds: epochs reported again and trials told
    already are skipped instead of told twice (Optuna refuses that).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._best_scores: dict[str, float] = {}

    def suggest(self, trial_id: str) -> dict | None:
        config = super().suggest(trial_id)
        self._ot_trials[trial_id].set_user_attr(TRIAL_ID_TAG, trial_id)  # the MLflow child run's tag too
        return config

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self._remember(trial_id, result)
        stored = self._stored(trial_id)
        if stored.state.is_finished() or result.get(TRAINING_ITERATION) in stored.intermediate_values:
            return
        super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        self._completed_trials.add(trial_id)
        stored = self._stored(trial_id)
        if stored.state.is_finished():
            return
        self._remember(trial_id, result)
        # Ray hands a result that ends the trial (ASHA's stop, the epoch budget) to on_trial_complete alone:
        # report it, or Optuna's curve stops an epoch short and a pruned trial keeps its previous epoch's score.
        score, step = (result or {}).get(self.metric), (result or {}).get(TRAINING_ITERATION)
        if score is not None and score == score and step is not None and step not in stored.intermediate_values:
            self._ot_trials[trial_id].report(score, step)
        state = OPTUNA_STATES[trial_outcome(result, error)]
        value = self._best_scores.get(trial_id) if state == TrialState.COMPLETE else None
        if state == TrialState.COMPLETE and value is None:
            state = TrialState.FAIL  # finished without a usable score
        self.study.tell(self._ot_trials[trial_id], value, state=state)

    def _stored(self, trial_id: str) -> optuna.trial.FrozenTrial:
        """The trial as the storage has it now."""
        return self.study._storage.get_trial(self._ot_trials[trial_id]._trial_id)

    def _remember(self, trial_id: str, result: dict | None) -> None:
        score = (result or {}).get(self.metric)
        if score is not None and improves(self.mode, score, self._best_scores.get(trial_id)):
            self._best_scores[trial_id] = score

    @property
    def study(self) -> optuna.Study:
        assert self._ot_study is not None, "made with a space, metric and mode, so Ray has set up its study"
        return self._ot_study


def make_searcher(space: Space, config: StudyConfig) -> PruneAwareOptunaSearch:
    """TPE over the space, seeded; the Optuna study in config.optuna_storage under the study's name."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=config.seed)
    storage = open_optuna_storage(config.optuna_storage) if config.optuna_storage else None
    searcher = PruneAwareOptunaSearch(
        space=space.sample,
        metric=config.metric,
        mode=config.mode,
        sampler=sampler,
        storage=storage,
        study_name=config.name if storage else None,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        searcher.study.set_metric_names([config.metric])  # optuna-dashboard's axis: val_acc, not "Objective 0"
    return searcher


def make_trainable(setup: TrialSetup, config: StudyConfig):
    return tune.with_resources(
        tune.with_parameters(train_trial, setup=setup),
        {"cpu": config.cpus_per_trial, "gpu": config.gpus_per_trial or 0},
    )


def restore_tuner(setup: TrialSetup, config: StudyConfig) -> tune.Tuner:
    """Continue an interrupted study: finished trials kept, unfinished ones from their last checkpoint.

    Ray restores the searcher (with its Optuna study), the scheduler and the callbacks
    as they were pickled; only the trainable, which holds this process's data paths,
    is given anew.
    """
    return tune.Tuner.restore(
        config.experiment_location,
        trainable=make_trainable(setup, config),
        resume_unfinished=True,
        resume_errored=False,
    )


def unfinished_trials(config: StudyConfig) -> int:
    """Trials of the study not yet ended, by Ray's last snapshot of the experiment.

    That snapshot is what --resume restores. On Ctrl-C Ray takes it before it stops the
    running trials, and then marks its in-memory copies of them TERMINATED, so the
    ResultGrid's counts would take an interrupted last wave for a finished study.
    """
    try:
        trials = ExperimentAnalysis(config.experiment_location).trials
    except ValueError:  # no snapshot at all: nothing is recorded as ended
        return config.trials
    return config.trials - sum(trial.status in (Trial.TERMINATED, Trial.ERROR) for trial in trials)


def make_tuner(
    space: Space, setup: TrialSetup, config: StudyConfig, callbacks: list, trainable=None, verbose: bool = False
) -> tune.Tuner:
    """The study's Tuner; `trainable` replaces make_trainable(setup, config) (benchmarks inject a fixed-cost one).

    verbose: Tune's own progress output besides the study's lines (run.py --verbose).
    """
    scheduler = ASHAScheduler(
        time_attr="epoch",
        max_t=setup.epochs,
        grace_period=config.asha_grace_period,
        reduction_factor=config.reduction_factor,
    )
    return tune.Tuner(
        trainable if trainable is not None else make_trainable(setup, config),
        tune_config=tune.TuneConfig(
            metric=config.metric,
            mode=config.mode,
            search_alg=make_searcher(space, config),
            scheduler=scheduler,
            num_samples=config.trials,
            max_concurrent_trials=config.max_concurrent,
            # Keep worker processes (with torch and timm imported) from trial to trial.
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=config.name,
            storage_path=config.storage_path,  # a folder's absolute path, or a URI (search.study.storage)
            # result.json per trial (what Tune reads back); MLflow is the record, not CSV or TensorBoard.
            callbacks=[JsonLoggerCallback(), EpochPrinter(setup.epochs, config.metric, config.trials), *callbacks],
            # The best checkpoint for the study, the latest for resuming: Ray keeps both.
            checkpoint_config=tune.CheckpointConfig(
                num_to_keep=1, checkpoint_score_attribute=config.metric, checkpoint_score_order=config.mode
            ),
            # A crashed trial is retried from its last checkpoint this many times, then failed.
            failure_config=tune.FailureConfig(max_failures=config.max_failures),
            verbose=1 if verbose else 0,  # EpochPrinter says what happens, one line per event
        ),
    )


def trial_setup(config: StudyConfig, spec: ModelSpec, train: CachedSplit, val: CachedSplit) -> TrialSetup:
    """What the trainable takes from the study's configuration, handed to every trial once."""
    return TrialSetup(
        model=spec,
        train=train,
        val=val,
        epochs=config.epochs,
        metric=config.metric,
        seed=config.seed,
        gpu_fraction=config.gpus_per_trial or 0.0,
        cpus=config.cpus_per_trial,
        speed=speed_options(config),
    )


def speed_options(config: StudyConfig) -> SpeedOptions:
    """The CUDA speed flags: the trials train with them, and the GPU probe measures with them."""
    return SpeedOptions(
        amp=config.amp,
        channels_last=config.channels_last,
        cudnn_benchmark=config.cudnn_benchmark,
        compile=config.compile,
    )
