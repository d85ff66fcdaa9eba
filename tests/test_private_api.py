"""The private attributes of Ray and Optuna that this project reads, checked on the real objects: a Ray or Optuna
release that moves one fails here by name, not in the middle of a study. pyproject.toml pins both to the minor
these ran on; widen a pin only once this passes against the newer release."""

from __future__ import annotations

import optuna
import pytest

from search.study.tuning import PruneAwareOptunaSearch

TRIAL = "trial_1"


def space(trial: optuna.Trial) -> None:
    trial.suggest_float("lr", 1e-4, 1e-2, log=True)


@pytest.fixture(scope="module")
def searcher() -> PruneAwareOptunaSearch:
    """A real searcher after Ray has set up its study and handed out one trial."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    made = PruneAwareOptunaSearch(space=space, metric="val_acc", mode="max", sampler=optuna.samplers.TPESampler(seed=0))
    assert made.suggest(TRIAL) is not None
    return made


@pytest.mark.parametrize(
    "attribute, kind",
    [("_ot_study", optuna.Study), ("_ot_trials", dict), ("_completed_trials", set)],
)
def test_ray_optuna_search_keeps_what_prune_aware_optuna_search_reads(searcher, attribute, kind):
    assert isinstance(getattr(searcher, attribute, None), kind), (
        f"ray.tune.search.optuna.OptunaSearch has no {attribute} ({kind.__name__}) any more: "
        f"search/study/tuning.py (PruneAwareOptunaSearch) reads it"
    )


def test_ray_optuna_search_keeps_each_trial_as_an_optuna_trial(searcher):
    trial = searcher._ot_trials.get(TRIAL)
    assert isinstance(trial, optuna.Trial), (
        "OptunaSearch._ot_trials no longer maps Ray's trial id to an optuna.Trial: search/study/tuning.py "
        "(PruneAwareOptunaSearch.suggest, on_trial_complete) reads it"
    )


def test_optuna_study_keeps_its_storage(searcher):
    assert isinstance(getattr(searcher._ot_study, "_storage", None), optuna.storages.BaseStorage), (
        "optuna.Study has no _storage any more: search/study/tuning.py (PruneAwareOptunaSearch._stored) and "
        "search/tracking/optuna_store.py (fail_orphans) read it"
    )


def test_optuna_trials_keep_their_storage_id(searcher):
    trial = searcher._ot_trials[TRIAL]
    frozen = searcher._ot_study.get_trials(deepcopy=False)[0]
    for owner, value in (("optuna.Trial", trial), ("optuna.trial.FrozenTrial", frozen)):
        assert isinstance(getattr(value, "_trial_id", None), int), (
            f"{owner} has no _trial_id any more: search/study/tuning.py (PruneAwareOptunaSearch._stored) and "
            f"search/tracking/optuna_store.py (fail_orphans) read it"
        )
    assert searcher._stored(TRIAL).number == trial.number  # the storage finds the trial by it


def test_ray_constants_keep_the_cluster_switch():
    from ray._private import ray_constants

    assert hasattr(ray_constants, "ENABLE_RAY_CLUSTER"), (
        "ray._private.ray_constants has no ENABLE_RAY_CLUSTER any more: search/study/driver.py (start_ray) sets it"
    )
