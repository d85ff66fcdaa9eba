"""--warm-start STUDY: an earlier study's best configurations are a new study's first trials.

Another seed, new data, another image size: what won before is the best first guess, and
TPE learns from those trials as from its own. They are taken from the earlier study's
Optuna database (its study.yaml on its MLflow run says where), best first, and queued in
the new study's Optuna study; the new study's space decides which of their values apply.
"""

from __future__ import annotations

import math

from optuna.trial import FrozenTrial, TrialState

from search.errors import UsageError
from search.records.study_config import StudyConfig
from search.study.spaces import Space
from search.tracking.optuna_store import load_study
from search.tracking.store import mlflow_client
from search.tracking.study_run import find_study, read_study_config


def warm_start_configs(config: StudyConfig, space: Space) -> list[dict]:
    """The earlier study's config.warm_start_top best configurations, best first, each limited to the parameters
    this study's space searches; a one-line UsageError where there is nothing to start from."""
    name, where = config.warm_start, f"--tracking-uri {config.tracking_uri}"
    assert name is not None, "called for a warm start only"
    parent = find_study(config.tracking_uri, name)
    if parent is None:
        raise UsageError(f"--warm-start {name}: no study of that name in {where}; give one that ran there")
    earlier = read_study_config(mlflow_client(config.tracking_uri, create=False), parent)
    if earlier.model != config.model:
        raise UsageError(
            f"--warm-start {name}: that study searched --model {earlier.model}, whose configurations do not apply "
            f"to {config.model}; warm-start from a {config.model} study"
        )
    study = load_study(earlier.optuna_storage, name) if earlier.optuna_storage else None
    best = best_trials(study.get_trials(deepcopy=False) if study else [], earlier.mode)[: config.warm_start_top]
    if not best:
        raise UsageError(f"--warm-start {name}: that study has no completed trial to start from; choose another")
    return [space.point(configuration(trial, space)) for trial in best]


def configuration(trial: FrozenTrial, space: Space) -> dict:
    """The hyperparameters an earlier trial ran with, as far as its params say: a knob it switched off takes this
    space's `off` value (the earlier study gave it as a constant, which Optuna does not keep)."""
    values = space.hyperparameters(trial.params)
    for parameter in space.parameters:
        if parameter.switch is not None and trial.params.get(parameter.switch) is False:
            values[parameter.name] = parameter.off
    return values


def best_trials(trials: list[FrozenTrial], mode: str) -> list[FrozenTrial]:
    """The COMPLETE trials with a finite score, best first (a multi-objective study's: by its first objective)."""
    scored = [
        trial
        for trial in trials
        if trial.state == TrialState.COMPLETE and trial.values and math.isfinite(trial.values[0])
    ]
    return sorted(scored, key=lambda trial: trial.values[0], reverse=mode == "max")
