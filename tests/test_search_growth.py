"""Extending a finished study, warm-starting from an earlier one, and confirming the best configurations
with more seeds: the pieces alone (fast), then real studies read back from MLflow and Optuna (slow)."""

from __future__ import annotations

import math
from pathlib import Path

import optuna
import pytest
import yaml
from helpers import ROOT, run_script, study_config
from mlflow.tracking import MlflowClient

from search.study.confirm import Candidate, Confirmed, confirm_table, confirmed_winner, plan_retrains
from search.study.spaces import load_space
from search.study.storage import split
from search.study.tuning import InOrder, PruneAwareOptunaSearch, startup_trials
from search.study.warm_start import best_trials, configuration
from search.tracking.schema import TrialNames
from trainables.config import SEED

# ---------------------------------------------------------------- the pieces


def test_an_extension_numbers_its_trials_after_the_earlier_ones():
    names = TrialNames(trials=50, first=30)
    assert names.of("1_lr=0.001") == "t30"
    assert names.of("20_lr=0.001") == "t49"
    assert TrialNames(trials=3).of("2_lr=0.1") == "t01"


def test_a_confirmation_names_its_retrains_as_given():
    names = TrialNames(trials=30, given=("t07 seed 1", "t07 seed 2"))
    assert [names.of("1_x"), names.of("2_x")] == ["t07 seed 1", "t07 seed 2"]


def test_an_extension_trains_in_a_folder_of_its_own():
    first = study_config(name="s", trials=30, storage_path="/r")
    extended = study_config(name="s", trials=50, trials_before=30, storage_path="/r")
    assert first.experiment_location == "/r/s"
    assert extended.experiment_location == "/r/s/trials-31-50"
    assert extended.study_location == "/r/s"
    assert extended.search_trials == 20
    assert extended.confirm_location == "/r/s/trials-31-50/confirm"
    assert split(extended.experiment_location) == ("/r/s", "trials-31-50")


@pytest.mark.parametrize(
    "changes, problem",
    [
        (dict(trials=30, trials_before=30), "--trials 30"),
        (dict(trials=3, confirm=4), "--confirm 4"),
        (dict(confirm_seeds=0), "--confirm-seeds 0"),
        (dict(warm_start_top=0), "--warm-start-top 0"),
    ],
)
def test_settings_that_cannot_run_are_refused(changes, problem):
    from search.records.study_config import ConfigError

    with pytest.raises(ConfigError, match=problem):
        study_config(**changes)


def test_each_candidate_is_retrained_with_the_seeds_after_the_studys():
    chosen = [Candidate("t04", {"lr": 0.01}, 0.9), Candidate("t01", {"lr": 0.02}, 0.8)]
    retrains = plan_retrains(chosen, study_config(seed=5, confirm=2, confirm_seeds=2))
    assert [retrain.label for retrain in retrains] == ["t04 seed 6", "t04 seed 7", "t01 seed 6", "t01 seed 7"]
    assert retrains[1].config == {"lr": 0.01, SEED: 7}
    assert chosen[0].config == {"lr": 0.01}  # the candidate's own configuration is left as it was


def test_the_winner_has_the_best_mean_not_the_best_single_run():
    lucky = Confirmed("t00", (0.95, 0.70, 0.72))
    steady = Confirmed("t03", (0.90, 0.89, 0.91))
    assert confirmed_winner([lucky, steady], "max") is steady
    assert steady.mean == pytest.approx(0.90)
    assert steady.sd == pytest.approx(0.01)
    assert confirmed_winner([lucky, steady], "min") is lucky  # val_loss: lower is better
    tie = Confirmed("t05", (0.90, 0.90, 0.90))
    assert confirmed_winner([steady, tie], "max") is steady  # a tie keeps the better-searched one


def test_the_confirmation_table_shows_every_score_and_a_failed_retrain():
    config = study_config(name="s", confirm=2, confirm_seeds=2, seed=0)
    steady, broken = Confirmed("t03", (0.90, 0.89, 0.91)), Confirmed("t00", (0.95,))
    table = confirm_table([steady, broken], steady, config)
    assert "| trial | search (val_acc) | seed 1 | seed 2 | mean | sd |  |" in table
    assert "| t03 | 0.9000 | 0.8900 | 0.9100 | 0.9000 | 0.0100 | winner |" in table
    assert "| t00 | 0.9500 | failed | failed | 0.9500 | 0.0000 |  |" in table


@pytest.mark.filterwarnings("ignore:The value nan is not acceptable")  # Optuna fails that trial, as meant
def test_a_warm_start_takes_completed_trials_best_first():
    study = optuna.create_study(direction="maximize")
    for value, state in [(0.5, "COMPLETE"), (0.9, "COMPLETE"), (0.99, "PRUNED"), (math.nan, "COMPLETE"), (0.7, "FAIL")]:
        trial = study.ask()
        trial.suggest_float("lr", 1e-4, 1e-1)
        if state == "COMPLETE":
            study.tell(trial, value)
        else:
            study.tell(trial, state=getattr(optuna.trial.TrialState, state))
    best = best_trials(study.get_trials(), "max")
    assert [trial.value for trial in best] == [0.9, 0.5]
    assert [trial.value for trial in best_trials(study.get_trials(), "min")] == [0.5, 0.9]


def test_a_warm_start_keeps_what_an_earlier_trial_switched_off(tmp_path: Path):
    space_file = tmp_path / "space.yaml"
    space_file.write_text(
        "parameters:\n  lr: {type: float, low: 1.0e-4, high: 1.0e-3, log: true}\n"
        "  rotation_deg: {type: float, low: 5.0, high: 30.0, or: 0.0}\n"
    )
    space = load_space(space_file, "vit")
    study = optuna.create_study(direction="maximize")
    study.enqueue_trial({"lr": 5e-4, "rotation_deg_on": False})
    trial = study.ask()
    space.sample(trial)
    study.tell(trial, 0.9)
    earlier = configuration(study.get_trials()[0], space)
    assert earlier == {"lr": 5e-4, "rotation_deg": 0.0}
    assert space.point(earlier) == {"lr": 5e-4, "rotation_deg_on": False}


def test_the_searcher_hands_trials_hyperparameters_without_the_switches():
    space = load_space(Path(__file__).resolve().parents[1] / "spaces" / "vit.yaml", "vit")
    searcher = PruneAwareOptunaSearch(
        space=space.sample, switches=space.switches, metric="val_acc", mode="max", points_to_evaluate=[space.recipe()]
    )
    recipe, drawn = searcher.suggest("t00"), searcher.suggest("t01")
    assert recipe["rotation_deg"] == 15.0 and recipe["label_smoothing"] == 0.0  # the defaults, one off and one on
    for config in (recipe, drawn):
        assert not space.switches & set(config) and set(config) == {p.name for p in space.parameters}


def test_tpe_starts_with_a_sixth_of_the_budget_at_random_from_3_to_10():
    assert [startup_trials(trials) for trials in (1, 8, 30, 60, 200)] == [3, 3, 5, 10, 10]


def test_retrains_are_handed_out_in_order_then_none_and_survive_a_restore(tmp_path: Path):
    searcher = InOrder([{"lr": 1}, {"lr": 2}])
    assert searcher.suggest("a") == {"lr": 1}
    searcher.save(str(tmp_path / "state.pkl"))
    restored = InOrder([])
    restored.restore(str(tmp_path / "state.pkl"))
    assert restored.suggest("b") == {"lr": 2}
    assert restored.suggest("c") == InOrder.FINISHED


def test_confirm_more_configurations_than_trials_is_one_line(tmp_path: Path):
    result = run_script(
        "run.py", "--model", "vit", "--trials", "2", "--confirm", "3", "--data", "synthetic", cwd=tmp_path
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "search/run.py: error: --confirm 3: give 0 (no confirmation) to --trials 2"
    ]


# ---------------------------------------------------------------- real studies


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict:
    """A finished 2-trial vit study "first", confirmed: its best configuration retrained with one more seed."""
    root = tmp_path_factory.mktemp("growth")
    stores = {
        "root": root,
        "uri": f"sqlite:///{root}/mlflow.db",
        "flags": [
            "--model", "vit", "--tracking-uri", f"sqlite:///{root}/mlflow.db",
            "--storage-path", str(root / "ray"), "--cache-dir", str(root / "cache"),
        ],
        "study": ["--smoke", "--data", "synthetic:3", "--no-pretrained", "--epochs", "1", "--max-concurrent", "1"],
    }  # fmt: skip
    result = run_script(
        "run.py", *stores["flags"], *stores["study"], "--trials", "2", "--name", "first",
        "--confirm", "1", "--confirm-seeds", "1", cwd=root,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    stores["first_output"] = result.stdout
    return stores


def children(uri: str, study: str) -> tuple[object, list]:
    client = MlflowClient(uri)
    found = client.search_runs(["1"], f"tags.study = '{study}' and tags.model = 'vit'")
    parent = next(run for run in found if "mlflow.parentRunId" not in run.data.tags)
    runs = client.search_runs(["1"], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'", max_results=1000)
    return parent, runs


def optuna_trials(root: Path, study: str) -> list:
    return optuna.load_study(study_name=study, storage=f"sqlite:///{root}/optuna.db").get_trials()


@pytest.mark.slow
def test_a_confirmation_puts_its_retrains_and_the_spread_on_the_study(stores):
    parent, runs = children(stores["uri"], "first")
    retrains = {run.data.tags["trial"]: run for run in runs if run.data.tags.get("role") == "confirm"}
    winner = parent.data.tags["confirmed_winner"]
    # The recipe (t00) is confirmed too, with the same seed, wherever it is not the best configuration already.
    assert set(retrains) == {f"{winner} seed 1", "t00 seed 1"}
    assert retrains[f"{winner} seed 1"].data.params["seed"] == "1"
    assert retrains["t00 seed 1"].data.tags["recipe"] == "true"
    if winner != "t00":
        assert "confirmed_gain_over_recipe" in parent.data.metrics
        assert "Recipe:     confirmed " in stores["first_output"]
    assert parent.data.metrics["confirmed_runs"] == 2
    assert "confirmed_sd_val_acc" in parent.data.metrics
    client = MlflowClient(stores["uri"])
    table = Path(client.download_artifacts(parent.info.run_id, "confirm.md", str(stores["root"]))).read_text()
    assert f"| {winner} |" in table and "winner |" in table
    # final.py retrains the confirmed configuration: the search trial's hyperparameters, no seed among them
    best = yaml.safe_load(Path(stores["root"], "ray", "first", "best", "best_config.yaml").read_text())
    searched = next(run for run in runs if run.data.tags["trial"] == winner)
    assert best["trial"] == winner and searched.info.run_name.endswith(", best")  # named by its search trial
    assert {k: v for k, v in best["hyperparameters"].items() if k in searched.data.params} == {
        k: yaml.safe_load(v) for k, v in searched.data.params.items()
    }
    assert "Confirming the 1 best configuration(s)" in stores["first_output"]


@pytest.mark.slow
def test_a_warm_start_tries_the_earlier_studys_best_first(stores):
    expected = [trial.params for trial in best_trials(optuna_trials(stores["root"], "first"), "max")[:2]]
    result = run_script(
        "run.py", *stores["flags"], *stores["study"], "--trials", "3", "--name", "warm",
        "--warm-start", "first", "--warm-start-top", "2", "--confirm", "0", cwd=stores["root"],
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    warm = sorted(optuna_trials(stores["root"], "warm"), key=lambda trial: trial.number)
    assert [trial.params for trial in warm[1:3]] == expected  # after the recipe, t00
    assert warm[0].params == load_space(ROOT / "spaces" / "vit.yaml", "vit").recipe()
    assert len(warm) == 3
    assert "Warm start: 2 best configuration(s) of study first first, after the recipe" in result.stdout


@pytest.mark.slow
def test_an_extended_study_keeps_one_run_with_every_trial_once(stores):
    for args, error in [
        (
            [],
            "study 'first' already finished its 2 trials: extend it with --resume --trials N (N > 2), or start a "
            "new one with another --name",
        ),
        (["--trials", "1"], "--trials 1: study 'first' has 2 already; give more to extend it"),
    ]:
        refused = run_script("run.py", *stores["flags"], "--resume", "--name", "first", *args, cwd=stores["root"])
        assert (refused.returncode, refused.stderr.strip()) == (2, f"search/run.py: error: {error}")
    before = {run.info.run_id for run in children(stores["uri"], "first")[1]}

    result = run_script(
        "run.py", *stores["flags"], "--resume", "--name", "first", "--trials", "3", "--confirm", "0",
        cwd=stores["root"],
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Extending study first from 2 to 3 trials" in result.stdout

    parent, runs = children(stores["uri"], "first")
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["extended"] == "2 -> 3"
    searched = sorted(run.data.tags["trial"] for run in runs if run.data.tags.get("role") != "confirm")
    assert searched == ["t00", "t01", "t02"]  # one run per trial: none duplicated, none lost
    assert len({run.data.tags["ray_trial_id"] for run in runs}) == len(runs)
    assert before < {run.info.run_id for run in runs}  # the earlier runs stay, as they were
    new = next(run for run in runs if run.data.tags["trial"] == "t02")
    assert new.info.status == "FINISHED" and new.data.tags["tune_run"] == "trials-3-3"

    trials = sorted(optuna_trials(stores["root"], "first"), key=lambda trial: trial.number)
    assert [trial.state.name for trial in trials] == ["COMPLETE"] * 3  # the same Optuna study, continued
    assert trials[2].params not in [trials[0].params, trials[1].params]  # new draws, not the first ones again
    recorded = yaml.safe_load(
        Path(
            MlflowClient(stores["uri"]).download_artifacts(parent.info.run_id, "study.yaml", str(stores["root"]))
        ).read_text()
    )
    assert (recorded["trials"], recorded["trials_before"]) == (3, 2)
