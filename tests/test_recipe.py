"""The recipe is trial t00: queued first, never stopped by ASHA, tagged and said; the winner's gain over it and the
study's compute on the study's run, in its note and in the closing lines. In-process, without Ray: the session's
smoke study (tests/helpers/smoke_study.py) shows it in a real run."""

from __future__ import annotations

import pickle
from dataclasses import replace
from types import SimpleNamespace

import pytest
from helpers import ROOT, study_config
from helpers.winners import a_winner
from ray.tune.schedulers import TrialScheduler

from search.run import build_parser
from search.study.config import new_config
from search.study.confirm import Candidate, Confirmed, confirm_table, plan_retrains
from search.study.console import print_closing
from search.study.gain import baseline_metrics, confirmed_gain, search_gain
from search.study.report import StudySummary, TrialSummary, describe
from search.study.spaces import load_space
from search.study.tuning import RecipeKeepingASHA, make_scheduler, queued
from trainables.config import DEFAULTS

SPACE = load_space(ROOT / "spaces" / "vit.yaml", "vit")
CONTINUE, STOP = TrialScheduler.CONTINUE, TrialScheduler.STOP


# ---------------------------------------------------------------- t00 is the recipe


def test_a_new_study_queues_the_recipe_before_a_warm_starts_configurations():
    warm = [{"lr": 1e-3}]
    assert queued(SPACE, study_config(), warm) == [SPACE.recipe(), *warm]
    assert queued(SPACE, study_config(recipe=False), warm) == warm  # --no-recipe
    extension = study_config(trials=5, trials_before=3)
    assert extension.recipe and queued(SPACE, extension, warm) == warm  # its first search ran it
    recipe = SPACE.recipe()  # the defaults, clipped into the space: label smoothing's 0 is its switch off
    assert recipe["lr"] == DEFAULTS.lr and recipe["label_smoothing_on"] is False and "label_smoothing" not in recipe


def test_no_recipe_is_a_setting_of_the_study():
    def config(*flags: str):
        return new_config(build_parser().parse_args(["--model", "vit", "--data", "synthetic", *flags]))

    assert config().recipe and not config("--no-recipe").recipe
    assert "recipe: false" in config("--no-recipe").to_yaml()


def trial(counter: int) -> SimpleNamespace:
    """A Ray trial as the scheduler sees it: its id, and Tune's counter (1 for the first) in its tag."""
    return SimpleNamespace(trial_id=f"id{counter}", experiment_tag=f"{counter}_lr=0.001")


def asha(recipe: bool = True) -> RecipeKeepingASHA:
    scheduler = make_scheduler(study_config(recipe=recipe, epochs=4, grace_period=1, reduction_factor=2), 4)
    assert isinstance(scheduler, RecipeKeepingASHA)
    scheduler.set_search_properties("val_acc", "max")
    return scheduler


def test_asha_never_stops_the_recipe_but_compares_the_others_with_its_scores():
    scheduler = asha()
    recipe, strong, middling = trial(1), trial(2), trial(3)
    for each in (strong, recipe, middling):
        scheduler.on_trial_add(None, each)
    assert scheduler.on_trial_result(None, strong, {"epoch": 1, "val_acc": 0.9}) == CONTINUE
    # Below the rung's cutoff: plain ASHA stops it, the recipe goes on; its score stays in the rung.
    assert scheduler.on_trial_result(None, recipe, {"epoch": 1, "val_acc": 0.1}) == CONTINUE
    # 0.6 clears the rung's median of 0.9 and the recipe's 0.1; against 0.9 alone it would be stopped.
    assert scheduler.on_trial_result(None, middling, {"epoch": 1, "val_acc": 0.6}) == CONTINUE
    assert scheduler.on_trial_result(None, recipe, {"epoch": 2, "val_acc": 0.1}) == CONTINUE
    assert scheduler.on_trial_result(None, recipe, {"epoch": 4, "val_acc": 0.1}) == STOP  # the budget, spent
    restored = pickle.loads(pickle.dumps(asha()))  # as --resume brings it back: it knows the recipe alike
    restored.on_trial_add(None, strong)
    restored.on_trial_add(None, recipe)
    restored.on_trial_result(None, strong, {"epoch": 1, "val_acc": 0.9})
    assert restored.on_trial_result(None, recipe, {"epoch": 1, "val_acc": 0.1}) == CONTINUE


def test_without_a_recipe_asha_stops_the_first_trial_like_any_other():
    scheduler = asha(recipe=False)
    first, second = trial(1), trial(2)
    scheduler.on_trial_add(None, second)
    scheduler.on_trial_add(None, first)
    scheduler.on_trial_result(None, second, {"epoch": 1, "val_acc": 0.9})
    assert scheduler.on_trial_result(None, first, {"epoch": 1, "val_acc": 0.1}) == STOP


def test_the_recipe_is_confirmed_with_the_same_seeds_and_marked_in_the_table():
    config = study_config(confirm=1, confirm_seeds=2, seed=5)
    chosen = [Candidate("t03", {"lr": 0.01}, 0.9), Candidate("t00", {"lr": 0.02}, 0.7, recipe=True)]
    retrains = plan_retrains(chosen, config)
    assert [(r.label, r.config["seed"], r.recipe) for r in retrains] == [
        ("t03 seed 6", 6, False),
        ("t03 seed 7", 7, False),
        ("t00 seed 6", 6, True),
        ("t00 seed 7", 7, True),
    ]
    confirmed = [Confirmed("t03", (0.9, 0.8, 0.85)), Confirmed("t00", (0.7, 0.75, 0.8), recipe=True)]
    table = confirm_table(confirmed, confirmed[0], config)
    assert "its 1 best configuration(s) and the recipe (t00), each retrained" in table
    assert table.splitlines()[-1].endswith("| recipe |") and table.splitlines()[-2].endswith("| winner |")


# ---------------------------------------------------------------- the gain, and the compute


def summary(scores: dict[str, float], metric: str = "val_acc", **changes) -> StudySummary:
    """A finished study whose trials reached `scores` at their second epoch, t00 the recipe, 3 epochs each."""
    mode = "max" if metric != "val_loss" else "min"
    trials = tuple(
        TrialSummary(label, "completed", {}, ((1, score), (2, score)), f"id-{label}", recipe=label == "t00")
        for label, score in scores.items()
    )
    values = dict(
        name="s",
        model="vit",
        metric=metric,
        mode=mode,
        max_t=3,
        grace_period=1,
        reduction_factor=3,
        num_classes=10,
        planned_trials=len(trials),
        elapsed_s=60.0,
        trials=trials,
        compute_epochs=8.25,
    )
    return StudySummary(**{**values, **changes})  # type: ignore[arg-type]


def test_the_gain_is_in_points_for_an_accuracy_and_in_loss_for_a_loss():
    gain = search_gain(summary({"t00": 0.9331, "t01": 0.5, "t02": 0.9405}))
    assert gain is not None and gain.line() == "best t02 val_acc 0.9405, +0.74 points over the recipe (t00 0.9331)"
    loss = search_gain(summary({"t00": 0.45, "t01": 0.40}, metric="val_loss"))
    assert loss is not None and loss.value == pytest.approx(0.05)
    assert loss.line() == "best t01 val_loss 0.4000, 0.0500 lower (better) than the recipe (t00 0.4500)"
    won = search_gain(summary({"t00": 0.95, "t01": 0.95, "t02": 0.9}))  # a tie goes to the earliest: the recipe
    assert won is not None and won.line() == (
        "the recipe t00 is the best trial (val_acc 0.9500); the search found nothing better"
    )
    assert search_gain(summary({"t01": 0.9})) is None  # --no-recipe


def test_the_studys_run_logs_the_recipes_score_the_gain_and_the_compute():
    metrics = baseline_metrics(summary({"t00": 0.9331, "t01": 0.9405}))
    assert metrics == pytest.approx(
        {
            "compute_epochs": 8.25,
            "compute_vs_recipe": 8.25 / 3,
            "recipe_val_acc": 0.9331,
            "gain_over_recipe": 0.9405 - 0.9331,
        }
    )
    assert baseline_metrics(summary({"t01": 0.9})) == pytest.approx({"compute_epochs": 8.25, "compute_vs_recipe": 2.75})


def test_with_a_confirmation_the_gain_is_the_difference_of_means_over_the_same_seeds():
    def retrain(label: str, score: float) -> TrialSummary:
        return TrialSummary(label, "completed", {}, ((3, score),), f"id-{label}", recipe=label.startswith("t00"))

    retrains = tuple(
        retrain(label, score)
        for label, score in {"t02 seed 1": 0.92, "t02 seed 2": 0.93, "t00 seed 1": 0.90, "t00 seed 2": 0.89}.items()
    )
    confirmed = summary({"t00": 0.91, "t01": 0.5, "t02": 0.94}, retrains=retrains, winner_id="id-t02")
    gain = confirmed_gain(confirmed)
    assert gain is not None and gain.winner_score == pytest.approx(0.93) and gain.recipe_score == pytest.approx(0.90)
    assert sorted(gain.paired) == pytest.approx([0.02, 0.03, 0.04])
    assert gain.line() == (
        "confirmed t02 mean val_acc 0.9300, +3.00 points over the recipe's (t00 0.9000; "
        "per seed +2.00 to +4.00 points, 3 seeds)"
    )
    metrics = baseline_metrics(confirmed)
    assert metrics["confirmed_gain_over_recipe"] == pytest.approx(0.03)
    assert (metrics["confirmed_gain_min"], metrics["confirmed_gain_max"]) == pytest.approx((0.02, 0.04))


def test_the_closing_lines_and_the_note_give_the_gain_and_the_compute(capsys):
    study = summary({"t00": 0.9331, "t01": 0.5, "t02": 0.9405}, winner_id="id-t02")
    best = a_winner(trial="t02", trial_id="id-t02", metric="val_acc", best_value=0.9405, best_epoch=2)
    print_closing(replace(study_config(), name="s"), best, "/tmp/best", "1", study)
    lines = capsys.readouterr().out.splitlines()
    assert "Recipe:     best t02 val_acc 0.9405, +0.74 points over the recipe (t00 0.9331)" in lines
    assert "Compute:    8.2 full-resolution epochs, 2.8 recipe trainings" in lines
    note = describe(study, best, {}).splitlines()
    assert "Best t02 val_acc 0.9405, +0.74 points over the recipe (t00 0.9331)." in note
    assert "Compute: 8.2 full-resolution epochs, 2.8 recipe trainings." in note


# ---------------------------------------------------------------- a real study: the session's smoke study


def test_the_smoke_studys_t00_is_the_recipe_run_to_its_budget(smoke_study):
    t00 = smoke_study.children[0]
    assert t00.data.tags["trial"] == "t00" and t00.data.tags["recipe"] == "true"
    assert t00.data.tags["trial_status"] == "completed"
    assert not [run for run in smoke_study.children[1:] if "recipe" in run.data.tags]
    recipe = SPACE.hyperparameters(SPACE.recipe())
    recipe |= {p.name: p.off for p in SPACE.parameters if p.switch is not None and not SPACE.recipe()[p.switch]}
    assert {key: t00.data.params[key] for key in recipe} == {key: str(value) for key, value in recipe.items()}
    assert "t00 started (recipe): " in smoke_study.console
    metrics = smoke_study.parent.data.metrics
    assert metrics["recipe_val_acc"] == t00.data.metrics["best_val_acc"]
    assert metrics["gain_over_recipe"] == pytest.approx(metrics["best_val_acc"] - metrics["recipe_val_acc"])
    compute = sum(run.data.metrics["compute_epochs"] for run in smoke_study.children)
    assert metrics["compute_epochs"] == pytest.approx(compute)
    assert metrics["compute_vs_recipe"] == pytest.approx(compute / 3)
    closing = f"Compute:    {compute:.1f} full-resolution epochs, {compute / 3:.1f} recipe trainings"
    assert closing in smoke_study.console.splitlines()
    assert "Recipe:     " in smoke_study.console
