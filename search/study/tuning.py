"""The Tune wiring of a study: Optuna TPE proposes, ASHA stops, Ray Tune runs trials in GPU slots."""

from __future__ import annotations

import pickle
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import optuna
from optuna.trial import TrialState
from ray import tune
from ray.tune import ExperimentAnalysis
from ray.tune.experiment import Trial
from ray.tune.logger import JsonLoggerCallback
from ray.tune.result import TRAINING_ITERATION
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from search.records.study_config import RESOLUTION, StudyConfig
from search.records.trial_status import TrialStatus
from search.study.confirm import Retrain
from search.study.console import EpochPrinter
from search.study.spaces import Space
from search.study.storage import split
from search.tracking.optuna_store import open_optuna_storage
from search.tracking.schema import TRIAL_ID_TAG, TrialNames, recipe_labels, trial_outcome, tune_counter
from trainables.config import COSTS, SpeedOptions, keep_best
from trainables.data import CachedSplit
from trainables.engine import Resolutions
from trainables.fidelity import resolution_schedule
from trainables.spec import ModelSpec
from trainables.trainable import TrialSetup, train_trial

OPTUNA_STATES = {
    TrialStatus.COMPLETED: TrialState.COMPLETE,
    TrialStatus.PRUNED: TrialState.PRUNED,
    TrialStatus.FAILED: TrialState.FAIL,
}


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

    switches: frozenset[str] = frozenset()
    """The space's on/off choices (Space.switches): in Optuna's params, not in a trial's configuration."""

    def __init__(self, *args, switches: frozenset[str] = frozenset(), **kwargs):
        super().__init__(*args, **kwargs)
        self.switches = switches
        self._best_scores: dict[str, float] = {}
        self._costs: dict[str, float] = {}
        """A multi-objective study's: each trial's latest cost (latency, parameters or peak memory)."""

    def suggest(self, trial_id: str) -> dict | None:
        config = super().suggest(trial_id)
        self._ot_trials[trial_id].set_user_attr(TRIAL_ID_TAG, trial_id)  # the MLflow child run's tag too
        assert config is not None, "OptunaSearch proposes a configuration for every trial it is asked for"
        return {name: value for name, value in config.items() if name not in self.switches}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self._remember(trial_id, result)
        if self.multi_objective:
            return  # Optuna takes no intermediate values in a multi-objective study (Trial.report refuses them)
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
        score, step = (result or {}).get(self.score_metric), (result or {}).get(TRAINING_ITERATION)
        reportable = score is not None and score == score and step is not None
        if reportable and not self.multi_objective and step not in stored.intermediate_values:
            self._ot_trials[trial_id].report(score, step)
        state = OPTUNA_STATES[trial_outcome(result, error)]
        value = self._told(trial_id) if state == TrialState.COMPLETE else None
        if state == TrialState.COMPLETE and value is None:
            state = TrialState.FAIL  # finished without a usable score
        self.study.tell(self._ot_trials[trial_id], value, state=state)

    def _stored(self, trial_id: str) -> optuna.trial.FrozenTrial:
        """The trial as the storage has it now."""
        return self.study._storage.get_trial(self._ot_trials[trial_id]._trial_id)

    def _remember(self, trial_id: str, result: dict | None) -> None:
        score = (result or {}).get(self.score_metric)
        keep_best(self._best_scores, trial_id, score, self.score_mode)
        cost = (result or {}).get(self.metric[1]) if self.multi_objective else None
        if cost is not None:
            self._costs[trial_id] = cost

    def _told(self, trial_id: str) -> float | list[float] | None:
        """A completed trial's value for Optuna: its best score; in a multi-objective study [best score, cost]
        (the cost is the model's, whatever the epoch). None: nothing usable to tell."""
        score = self._best_scores.get(trial_id)
        if not self.multi_objective:
            return score
        cost = self._costs.get(trial_id)
        return None if score is None or cost is None else [score, cost]

    @property
    def multi_objective(self) -> bool:
        """Made with a list of metrics: the study's metric, then the cost it is traded against."""
        return isinstance(self.metric, list)

    @property
    def score_metric(self) -> str:
        """The study's metric: the best of it over a trial's epochs is what Optuna is told."""
        return self.metric[0] if isinstance(self.metric, list) else self.metric

    @property
    def score_mode(self) -> str:
        return self.mode[0] if isinstance(self.mode, list) else self.mode

    @property
    def study(self) -> optuna.Study:
        assert self._ot_study is not None, "made with a space, metric and mode, so Ray has set up its study"
        return self._ot_study


class InOrder(Searcher):
    """Hands out the given configurations in order, one trial each: a confirmation's retrains.

    (Ray's BasicVariantGenerator takes given points only for the keys of a search space, and a retrain's
    configuration is whole.)"""

    def __init__(self, configs: list[dict]):
        super().__init__()
        self.configs, self.given = configs, 0

    def suggest(self, trial_id: str) -> dict | None:
        if self.given == len(self.configs):
            return Searcher.FINISHED  # type: ignore[return-value]  # Ray's own searchers return it too
        self.given += 1
        return dict(self.configs[self.given - 1])

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        pass  # nothing to learn: the configurations are fixed

    def save(self, checkpoint_path: str) -> None:
        Path(checkpoint_path).write_bytes(pickle.dumps(self.__dict__))

    def restore(self, checkpoint_path: str) -> None:
        self.__dict__.update(pickle.loads(Path(checkpoint_path).read_bytes()))


TUNED_TPE = False
"""TPE set for this setting (tpe_sampler's `tuned`), or Optuna's defaults: decided by bench/search_efficiency.py."""


def startup_trials(trials: int) -> int:
    """Random trials before TPE models the results, sized to the budget: a sixth of it, from 3 to Optuna's 10.
    (Optuna's fixed 10 are a third of a 30-trial study and all of an 8-trial one.)"""
    return min(10, max(3, round(trials / 6)))


def tpe_sampler(seed: int, trials: int, tuned: bool = TUNED_TPE) -> optuna.samplers.TPESampler:
    """The study's TPE. Tuned: multivariate over groups of parameters that are sampled together (the conditional
    space's on/off switches and `when` branches), a constant liar for the trials running in parallel (they count
    as the worst result so far, so that two slots do not propose the same point), and startup_trials(trials)
    random trials first. Otherwise Optuna's defaults (independent, 10 random first, no liar)."""
    if not tuned:
        return optuna.samplers.TPESampler(seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # multivariate, group, liar
        return optuna.samplers.TPESampler(
            seed=seed,
            multivariate=True,
            group=True,
            constant_liar=True,
            n_startup_trials=startup_trials(trials),
        )


def make_searcher(space: Space, config: StudyConfig, first: Sequence[dict] = ()) -> PruneAwareOptunaSearch:
    """TPE over the space, seeded; the Optuna study in config.optuna_storage under the study's name (an extension's
    searcher loads it, and TPE goes on from every trial it holds); `first`: configurations tried before TPE's own
    (a warm start's), queued in the Optuna study."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # An extension's sampler gets a seed of its own: with the study's, its first random draws would repeat the
    # earlier search's first configurations.
    sampler = tpe_sampler(config.seed + config.trials_before, config.search_trials)
    storage = open_optuna_storage(config.optuna_storage) if config.optuna_storage else None
    metrics, modes = config.objectives
    searcher = PruneAwareOptunaSearch(
        space=space.sample,
        switches=space.switches,
        # Two objectives: TPE in its multi-objective form (MOTPE), the same seeded sampler.
        metric=metrics if config.cost else config.metric,
        mode=modes if config.cost else config.mode,
        sampler=sampler,
        storage=storage,
        study_name=config.name if storage else None,
        points_to_evaluate=list(first) or None,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        searcher.study.set_metric_names(metrics)  # optuna-dashboard's axes: val_acc, not "Objective 0"
    return searcher


def make_trainable(setup: TrialSetup, config: StudyConfig):
    return tune.with_resources(
        tune.with_parameters(train_trial, setup=setup),
        {"cpu": config.cpus_per_trial, "gpu": config.gpus_per_trial or 0},
    )


def restore_tuner(setup: TrialSetup, config: StudyConfig, location: str) -> tune.Tuner:
    """Continue an interrupted Tune run of the study (its search's, or its confirmation's, at `location`):
    finished trials kept, unfinished ones from their last checkpoint.

    Ray restores the searcher (with its Optuna study), the scheduler and the callbacks
    as they were pickled; only the trainable, which holds this process's data paths,
    is given anew.
    """
    return tune.Tuner.restore(
        location,
        trainable=make_trainable(setup, config),
        resume_unfinished=True,
        resume_errored=False,
    )


def unfinished_trials(location: str, planned: int) -> int:
    """Trials of the Tune run at `location` (of `planned`) not yet ended, by Ray's last snapshot of its experiment.

    That snapshot is what --resume restores. On Ctrl-C Ray takes it before it stops the
    running trials, and then marks its in-memory copies of them TERMINATED, so the
    ResultGrid's counts would take an interrupted last wave for a finished study.
    """
    try:
        trials = ExperimentAnalysis(location).trials
    except ValueError:  # no snapshot at all: nothing is recorded as ended
        return planned
    return planned - sum(trial.status in (Trial.TERMINATED, Trial.ERROR) for trial in trials)


def make_tuner(
    space: Space,
    setup: TrialSetup,
    config: StudyConfig,
    callbacks: list,
    trainable=None,
    verbose: bool = False,
    first: Sequence[dict] = (),
) -> tune.Tuner:
    """The Tuner of the study's search (an extension's new trials only); `trainable` replaces
    make_trainable(setup, config) (benchmarks inject a fixed-cost one).

    verbose: Tune's own progress output besides the study's lines (run.py --verbose); first: configurations
    to try before the searcher's own (a warm start's). A new study with a recipe (config.runs_recipe) tries the
    recipe before them all: its first trial, t00, which ASHA lets run its whole budget (RecipeKeepingASHA).
    """
    scheduler = make_scheduler(config, setup.epochs)
    searcher = make_searcher(space, config, queued(space, config, first))
    return tune.Tuner(
        trainable if trainable is not None else make_trainable(setup, config),
        tune_config=tune_config(config, searcher, config.search_trials, scheduler),
        run_config=run_config(
            config,
            config.experiment_location,
            setup.epochs,
            TrialNames(config.trials, config.trials_before),
            callbacks,
            verbose,
            recipe_labels(config.trials, config.runs_recipe),
        ),
    )


def queued(space: Space, config: StudyConfig, first: Sequence[dict] = ()) -> list[dict]:
    """What a search tries before TPE's own draws, as Optuna params, in order: the recipe where the search starts
    with it (config.runs_recipe), then `first` (a warm start's configurations)."""
    return [space.recipe(), *first] if config.runs_recipe else list(first)


def make_confirm_tuner(
    setup: TrialSetup, config: StudyConfig, retrains: Sequence[Retrain], callbacks: list, verbose: bool = False
) -> tune.Tuner:
    """The Tuner of the study's confirmation: each retrain's configuration (its seed in it) at the full epoch
    budget, in order, none stopped early by the search's scheduler."""
    return tune.Tuner(
        make_trainable(setup, config),
        tune_config=tune_config(config, InOrder([retrain.config for retrain in retrains]), len(retrains)),
        run_config=run_config(
            config,
            config.confirm_location,
            setup.epochs,
            TrialNames(config.trials, given=tuple(retrain.label for retrain in retrains)),
            callbacks,
            verbose,
            frozenset(retrain.label for retrain in retrains if retrain.recipe),
        ),
    )


def tune_config(
    config: StudyConfig, searcher: Searcher, samples: int, scheduler: TrialScheduler | None = None
) -> tune.TuneConfig:
    """How a Tune run of the study proposes and schedules its trials (no scheduler: each runs its whole budget)."""
    return tune.TuneConfig(
        metric=config.metric,
        mode=config.mode,
        search_alg=searcher,
        scheduler=scheduler,
        num_samples=samples,
        max_concurrent_trials=config.max_concurrent,
        # Keep worker processes (with torch and timm imported) from trial to trial.
        reuse_actors=True,
    )


def run_config(
    config: StudyConfig,
    location: str,
    epochs: int,
    names: TrialNames,
    callbacks: list,
    verbose: bool,
    recipe: frozenset[str] = frozenset(),
) -> tune.RunConfig:
    """Where a Tune run of the study keeps its trials (`location`: a folder's absolute path, or a URI), how it
    checkpoints and retries them, and what it says: one line per event (EpochPrinter), Tune's own with verbose;
    `recipe`: the names of its trials that train the recipe, which their lines say."""
    storage_path, name = split(location)
    return tune.RunConfig(
        name=name,
        storage_path=storage_path,
        # result.json per trial (what Tune reads back); MLflow is the record, not CSV or TensorBoard.
        callbacks=[
            JsonLoggerCallback(),
            EpochPrinter(epochs, config.metric, names, config.img_size, recipe),
            *callbacks,
        ],
        # The best checkpoint for the study, the latest for resuming: Ray keeps both.
        checkpoint_config=tune.CheckpointConfig(
            num_to_keep=1, checkpoint_score_attribute=config.metric, checkpoint_score_order=config.mode
        ),
        # A crashed trial is retried from its last checkpoint this many times, then failed.
        failure_config=tune.FailureConfig(max_failures=config.max_failures),
        verbose=1 if verbose else 0,
    )


def trial_setup(
    config: StudyConfig,
    spec: ModelSpec,
    train: CachedSplit,
    val: CachedSplit,
    resized: Mapping[int, tuple[CachedSplit, CachedSplit]] | None = None,
) -> TrialSetup:
    """What the trainable takes from the study's configuration, handed to every trial once; `resized`: train and
    val at each smaller size of the study's schedule (epoch_sizes), for a study with resolution as its fidelity."""
    return TrialSetup(
        model=spec,
        train=train,
        val=val,
        epochs=config.epochs,
        metric=config.metric,
        seed=config.seed,
        gpu_fraction=config.gpus_per_trial or 0.0,
        cpus=config.cpus_per_trial,
        speed=SpeedOptions.of(config),  # the study's CUDA speed flags
        measure_latency=config.cost == COSTS["latency"],
        resolutions=Resolutions(epoch_sizes(config), dict(resized or {})) if config.fidelity == RESOLUTION else None,
    )


def epoch_sizes(config: StudyConfig) -> tuple[int, ...]:
    """The image size of each epoch of the study's trials: all config.img_size, but with resolution as the fidelity,
    where the epochs before ASHA's first two rungs train smaller (trainables.fidelity.resolution_schedule)."""
    if config.fidelity != RESOLUTION:
        return (config.img_size,) * config.epochs
    return resolution_schedule(config.img_size, config.epochs, config.asha_grace_period, config.reduction_factor)


def smaller_sizes(config: StudyConfig) -> tuple[int, ...]:
    """The sizes below config.img_size the study's trials train at: what the cache must hold besides the full size."""
    return tuple(sorted({size for size in epoch_sizes(config) if size != config.img_size}))


def make_scheduler(config: StudyConfig, epochs: int) -> TrialScheduler:
    """ASHA for the metric alone. A multi-objective study gets no scheduler that stops trials (FIFO): ASHA ranks one
    metric, and on accuracy alone it would stop the cheap, less accurate trials the Pareto front is made of. Each
    of its trials stops itself instead, after early_stop_patience epochs without improvement, or at the budget."""
    if config.cost is not None:
        return FIFOScheduler()
    return RecipeKeepingASHA(
        time_attr="epoch",
        max_t=epochs,
        grace_period=config.asha_grace_period,
        reduction_factor=config.reduction_factor,
        recipe=config.runs_recipe,
    )


class RecipeKeepingASHA(ASHAScheduler):
    """ASHA that never stops the recipe trial: the first trial of a search that starts with the recipe (t00).

    The recipe's score is the baseline the winner's gain is measured against: it must be the score of its whole
    budget, as the seed document would train it. Its results still fill ASHA's rungs, so the other trials are
    compared with it as with any other. Which trial it is comes from the trial's own tag (Tune's counter, 1 for
    the first trial), not from state: Ray restores a study's scheduler as it was made, and adds its trials again.
    """

    def __init__(self, *args, recipe: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.recipe = recipe

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        decision = super().on_trial_result(tune_controller, trial, result)  # the result goes into its rung
        if (
            decision != TrialScheduler.STOP
            or not self.is_recipe(trial)
            or result.get(self._time_attr, 0) >= self._max_t
        ):
            return decision
        self._num_stopped -= 1  # ASHA counted it as stopped
        return TrialScheduler.CONTINUE

    def is_recipe(self, trial) -> bool:
        return self.recipe and tune_counter(trial.experiment_tag) == 0
