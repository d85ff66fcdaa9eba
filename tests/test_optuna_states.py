"""How trials reach Optuna: finished -> COMPLETE (best score), ASHA-stopped -> PRUNED, crashed -> FAIL."""

from pathlib import Path

import pytest
from helpers import study_config
from optuna.trial import TrialState

from search.study.spaces import load_space
from search.study.tuning import make_searcher

SPACES = Path(__file__).resolve().parents[1] / "spaces"


@pytest.fixture
def searcher():
    return make_searcher(load_space(SPACES / "cnn.yaml", "cnn"), study_config(metric="val_acc"))


def epoch(value: float, number: int, finished: bool = False) -> dict:
    return {"val_acc": value, "epoch": number, "training_iteration": number, "finished": finished}


def state_of(searcher, index: int):
    return searcher.study.trials[index]


def test_finished_trial_is_complete_with_its_best_score(searcher):
    config = searcher.suggest("a")
    assert "lr" in config and config["batch_size"] in (16, 32)
    searcher.on_trial_result("a", epoch(0.5, 1))
    searcher.on_trial_result("a", epoch(0.8, 2))
    searcher.on_trial_complete("a", epoch(0.7, 3, finished=True))  # the budget's last epoch: here alone
    trial = state_of(searcher, 0)
    assert trial.state == TrialState.COMPLETE
    assert trial.value == pytest.approx(0.8)
    assert trial.intermediate_values == {1: 0.5, 2: 0.8, 3: 0.7}


def test_trial_stopped_by_asha_is_pruned_not_complete(searcher):
    searcher.suggest("b")
    searcher.on_trial_result("b", epoch(0.3, 1))
    # ASHA's STOP: Ray hands the stopping result to on_trial_complete alone (not on_trial_result), error=False.
    searcher.on_trial_complete("b", epoch(0.35, 2, finished=False))
    trial = state_of(searcher, 0)
    assert trial.state == TrialState.PRUNED
    assert trial.intermediate_values == {1: 0.3, 2: 0.35}
    assert trial.value == pytest.approx(0.35)  # Optuna's value of a pruned trial: its last report


def test_crashed_trial_is_a_failure_even_after_reporting(searcher):
    searcher.suggest("c")
    searcher.on_trial_result("c", epoch(0.9, 1))
    searcher.on_trial_complete("c", None, error=True)
    assert state_of(searcher, 0).state == TrialState.FAIL


def test_minimised_metric_keeps_the_lowest(searcher):
    minimiser = make_searcher(load_space(SPACES / "cnn.yaml", "cnn"), study_config(metric="val_loss"))
    minimiser.suggest("d")
    for number, loss in enumerate([1.0, 0.4, 0.6], start=1):
        minimiser.on_trial_result("d", {"val_loss": loss, "epoch": number, "training_iteration": number})
    minimiser.on_trial_complete("d", {"val_loss": 0.6, "epoch": 3, "training_iteration": 3, "finished": True})
    assert minimiser.study.trials[0].value == pytest.approx(0.4)


def test_a_study_in_a_database_is_told_once_even_when_a_resume_replays_it(tmp_path):
    """A resumed searcher comes from Ray's last snapshot, which can predate what the database holds."""
    import optuna

    from search.tracking.optuna_store import fail_orphans

    storage = f"sqlite:///{tmp_path}/optuna.db"
    config = study_config(name="replayed", optuna_storage=storage)
    searcher = make_searcher(load_space(SPACES / "cnn.yaml", "cnn"), config)
    searcher.suggest("a")
    searcher.on_trial_result("a", epoch(0.5, 1))
    searcher.save(str(tmp_path / "snapshot.pkl"))  # Ray's snapshot, taken before the trial ended
    searcher.on_trial_result("a", epoch(0.8, 2))
    searcher.on_trial_complete("a", epoch(0.8, 2, finished=True))

    restored = make_searcher(load_space(SPACES / "cnn.yaml", "cnn"), study_config())
    restored.restore(str(tmp_path / "snapshot.pkl"))
    restored.on_trial_result("a", epoch(0.5, 1))  # replayed epochs: already in the database
    restored.on_trial_result("a", epoch(0.8, 2))
    restored.on_trial_complete("a", epoch(0.8, 2, finished=True))  # told already: not again

    study = optuna.load_study(study_name="replayed", storage=storage)
    [trial] = study.trials
    assert trial.state == TrialState.COMPLETE and trial.value == pytest.approx(0.8)
    assert trial.intermediate_values == {1: 0.5, 2: 0.8}
    assert trial.user_attrs == {"ray_trial_id": "a"} and study.metric_names == ["val_acc"]

    study.ask()  # asked after the snapshot, then lost with the killed driver: no Ray trial will tell it
    assert fail_orphans(study) == 1
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.FAIL]
