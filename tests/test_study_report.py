"""The study report: ASHA rungs as Ray computes them, chance levels, the note, and real PNG plots.

One in-memory Optuna study stands for a finished search: completed trials with their
best score, ASHA-pruned ones with intermediate values, one crash, and the matching
TrialSummary records that MLflow would give.
"""

from __future__ import annotations

import math
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import optuna
import pytest
from helpers.winners import a_winner
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState
from ray.tune.schedulers import ASHAScheduler

from search.records.winner import Winner
from search.study.report import (
    PLOTS,
    StudySummary,
    TrialSummary,
    asha_rungs,
    chance_level,
    describe,
    drawable,
    importances,
    outcome_counts,
    tie_line,
    write_plots,
)

NAME, CLASSES, MAX_T, GRACE, RF = "cnn-report", 11, 9, 1, 3
DISTRIBUTIONS = {
    "lr": FloatDistribution(1e-5, 1e-2, log=True),
    "weight_decay": FloatDistribution(0.0, 0.1),
    "dropout": FloatDistribution(0.0, 0.5),
    "batch_size": CategoricalDistribution([16, 32, 64]),
}
# (outcome, epochs reached): ASHA prunes at its rungs (1 and 3 of 9); one trial crashes in epoch 3.
PLAN = [
    ("completed", 9),
    ("pruned", 1),
    ("pruned", 3),
    ("completed", 9),
    ("pruned", 1),
    ("failed", 2),
    ("completed", 7),  # stopped itself early: still completed
    ("pruned", 3),
    ("pruned", 1),
    ("completed", 9),
]


def sampled_params(rng: np.random.Generator) -> dict:
    return {
        "lr": float(10 ** rng.uniform(-5, -2)),
        "weight_decay": float(rng.uniform(0, 0.1)),
        "dropout": float(rng.uniform(0, 0.5)),
        "batch_size": int(rng.choice([16, 32, 64])),
    }


def curve_for(params: dict, epochs: int, rng: np.random.Generator) -> tuple[tuple[int, float], ...]:
    """Accuracy rising towards a ceiling set by how close lr is to 1e-3."""
    ceiling = 0.95 - 0.25 * abs(math.log10(params["lr"]) + 3)
    return tuple(
        (epoch, float(np.clip(ceiling * (1 - math.exp(-epoch / 2.5)) + rng.normal(0, 0.02), 0, 1)))
        for epoch in range(1, epochs + 1)
    )


def build(plan: list[tuple[str, int]], seed: int = 0) -> tuple[optuna.Study, StudySummary]:
    """An Optuna study as PruneAwareOptunaSearch leaves it, and the StudySummary MLflow would give."""
    rng = np.random.default_rng(seed)
    study = optuna.create_study(direction="maximize", study_name=NAME)
    trials = []
    for number, (outcome, epochs) in enumerate(plan):
        params = sampled_params(rng)
        curve = curve_for(params, epochs, rng)
        state = {"completed": TrialState.COMPLETE, "pruned": TrialState.PRUNED, "failed": TrialState.FAIL}[outcome]
        study.add_trial(
            optuna.trial.create_trial(
                params=params,
                distributions=DISTRIBUTIONS,
                value=max(value for _, value in curve) if state == TrialState.COMPLETE else None,
                intermediate_values=dict(curve),
                state=state,
            )
        )
        trials.append(TrialSummary(f"t{number:02d}", outcome, params, curve, trial_id=f"ab12_{number:05d}"))
    summary = StudySummary(
        name=NAME,
        model="cnn",
        metric="val_acc",
        mode="max",
        max_t=MAX_T,
        grace_period=GRACE,
        reduction_factor=RF,
        num_classes=CLASSES,
        planned_trials=len(plan),
        elapsed_s=3725.4,
        trials=tuple(trials),
    )
    return study, summary


@pytest.fixture(scope="module")
def built():
    return build(PLAN)


def winner_of(summary: StudySummary) -> Winner:
    best = summary.best_trial
    point = best.best("max") if best else None
    assert best is not None and point is not None
    epoch, value = point
    return a_winner(trial_id=best.trial_id, metric="val_acc", best_value=value, best_epoch=epoch)


# ---------------------------------------------------------------- arithmetic


@pytest.mark.parametrize(
    ("grace", "rf", "max_t"), [(1, 3, 9), (1, 3, 10), (2, 3, 15), (1, 2, 16), (1, 4, 100), (3, 2, 3), (5, 3, 4)]
)
def test_asha_rungs_are_the_rungs_ray_compares_at(grace, rf, max_t):
    # As tuning.make_tuner builds it; a result at max_t stops the trial before any rung is asked.
    scheduler = ASHAScheduler(time_attr="epoch", max_t=max_t, grace_period=min(grace, max_t), reduction_factor=rf)
    ray_rungs = sorted(milestone for milestone, _ in scheduler._brackets[0]._rungs if milestone < max_t)
    assert asha_rungs(min(grace, max_t), rf, max_t) == ray_rungs


def test_asha_rungs_examples():
    assert asha_rungs(1, 3, 9) == [1, 3]
    assert asha_rungs(2, 3, 15) == [2, 6]
    assert asha_rungs(4, 2, 4) == []
    with pytest.raises(ValueError, match="reduction_factor"):
        asha_rungs(1, 1, 9)


def test_chance_levels():
    assert chance_level("val_acc", 4) == 0.25
    assert chance_level("val_balanced_acc", 10) == pytest.approx(0.1)
    assert chance_level("val_macro_f1", 5) == pytest.approx(0.2)
    assert chance_level("val_loss", 11) == pytest.approx(math.log(11))
    with pytest.raises(ValueError, match="val_acc"):
        chance_level("val_accuracy", 4)


def test_outcome_counts_in_order(built):
    _, summary = built
    counts = outcome_counts(summary.trials)
    assert counts == {"completed": 4, "pruned": 5, "failed": 1}
    assert list(counts) == ["completed", "pruned", "failed"]
    lost = TrialSummary("t10", "lost", {}, ())
    assert list(outcome_counts([lost, *summary.trials[:2]])) == ["completed", "pruned", "failed", "lost"]


def test_best_epoch_follows_the_mode():
    trial = TrialSummary("t00", "completed", {}, ((1, 0.9), (2, 0.4), (3, math.nan), (4, 0.4)))
    assert trial.best("max") == (1, 0.9)
    assert trial.best("min") == (4, 0.4)  # the last of equals: the checkpoint Ray keeps, the winner record's epoch
    assert trial.epochs == 4
    assert TrialSummary("t01", "failed", {}, ()).best("max") is None
    with pytest.raises(ValueError, match="increasing"):
        TrialSummary("t02", "completed", {}, ((2, 0.1), (1, 0.2)))


def tied_study(scores: dict[str, float], winner_id: str = "", **changes) -> StudySummary:
    """Trials of two epochs that end on the given best scores; Ray's ids are id_<label>."""
    trials = tuple(
        TrialSummary(label, "completed", {}, ((1, score - 0.1), (2, score)), trial_id=f"id_{label}")
        for label, score in scores.items()
    )
    summary = StudySummary("tie", "cnn", "val_acc", "max", 2, 1, 3, CLASSES, len(trials), 60.0, trials)
    return replace(summary, winner_id=winner_id, **changes)


def test_a_shared_best_score_is_a_tie_the_earliest_trial_wins_and_the_note_says_so():
    # In MLflow's order the trials come by label text: t100 (an extension's) before t99. The rule is by number.
    summary = tied_study({"t100": 0.4205, "t99": 0.4205, "t07": 0.3, "t12": 0.4205})
    assert [trial.label for trial in summary.ranked()] == ["t12", "t99", "t100", "t07"]
    assert summary.best_trial is not None and summary.best_trial.label == "t12"
    line = "Tie: t12, t99 and t100 all reached val_acc 0.4205; t12 won: a tie goes to the earliest trial."
    assert tie_line(summary) == line
    winner = a_winner(trial="t12", trial_id="id_t12", metric="val_acc", best_value=0.4205, best_epoch=2)
    note = describe(replace(summary, winner_id="id_t12"), winner, {})
    assert note.splitlines()[:3] == ["best val_acc 0.4205 (chance 0.0909), trial t12 at epoch 2", "", line]
    two = tied_study({"t00": 0.5, "t01": 0.5})
    assert tie_line(two) == "Tie: t00 and t01 both reached val_acc 0.5000; t00 won: a tie goes to the earliest trial."


def test_no_tie_line_without_a_tie_or_where_a_confirmation_chose():
    assert tie_line(tied_study({"t00": 0.5, "t01": 0.4999})) is None
    retrain = TrialSummary("t00 seed 1", "completed", {}, ((1, 0.5),), trial_id="id_retrain")
    assert tie_line(tied_study({"t00": 0.5, "t01": 0.5}, retrains=(retrain,))) is None
    assert "Tie:" not in describe(tied_study({"t00": 0.5}), None, {})


# ---------------------------------------------------------------- importances


def test_importances_cover_the_varying_params(built):
    study, _ = built
    shares = importances(study)
    assert set(shares) == set(DISTRIBUTIONS)
    assert sum(shares.values()) == pytest.approx(1.0)
    assert importances(study) == shares  # seeded


def test_importances_leave_out_a_param_that_never_varies():
    study = optuna.create_study(direction="maximize")
    for number, lr in enumerate([1e-4, 1e-3, 1e-2]):
        study.add_trial(
            optuna.trial.create_trial(
                params={"lr": lr, "dropout": 0.1},
                distributions={"lr": DISTRIBUTIONS["lr"], "dropout": DISTRIBUTIONS["dropout"]},
                value=0.5 + 0.1 * number,
            )
        )
    assert list(importances(study)) == ["lr"]


def test_importances_need_two_completed_trials(built):
    study, _ = built
    one = optuna.create_study(direction="maximize")
    one.add_trial(study.trials[0])
    assert importances(one) == {}
    assert importances(None) == {}


# ---------------------------------------------------------------- the note


def test_describe_leads_with_the_winner(built):
    _, summary = built
    winner = winner_of(summary)
    best = summary.best_trial
    assert best is not None
    note = describe(summary, winner, {"lr": 0.00031, "batch_size": 32})
    headline = note.splitlines()[0]
    assert f"best val_acc {winner.best_value:.4f}" in headline
    assert f"chance {1 / CLASSES:.4f}" in headline
    assert f"trial {best.label} at epoch {winner.best_epoch}" in headline
    assert "10 trials: 4 completed, 5 pruned, 1 failed" in note
    assert "1 h 02 min 05 s" in note
    table = [line for line in note.splitlines() if re.match(r"\| t\d\d \|", line)]
    assert len(table) == 5
    assert table[0].startswith(f"| {best.label} |")
    assert "| lr | 0.00031 |" in note
    assert f"python search/final.py --study {NAME}" in note


def test_describe_says_when_fewer_trials_ran_than_planned(built):
    _, summary = built
    note = describe(replace(summary, planned_trials=30, elapsed_s=65.0), winner_of(summary), {})
    assert "10 of 30 planned trials ran: 4 completed, 5 pruned, 1 failed" in note
    assert "1 min 05 s" in note


def test_describe_without_a_winner():
    _, summary = build([("failed", 0), ("failed", 0)])
    note = describe(summary, None, {})
    assert "no trial produced a result" in note
    assert "chance" in note
    assert "final.py" not in note
    assert "2 trials: 0 completed" not in note and "2 trials: 2 failed" in note


# ---------------------------------------------------------------- the plots


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG"), path
    assert len(data) > 5_000, f"{path.name} is {len(data)} bytes: an empty figure?"


def test_write_plots_for_a_normal_study(built, tmp_path):
    import matplotlib

    study, summary = built
    background = matplotlib.rcParams["axes.facecolor"]
    paths = write_plots(study, summary, tmp_path)
    assert paths == [tmp_path / f"{name}.png" for name in PLOTS]
    for path in paths:
        assert_png(path)
    assert matplotlib.rcParams["axes.facecolor"] == background  # Optuna's ggplot style stayed inside


def test_write_plots_without_a_complete_trial_draws_the_learning_curves_only(tmp_path):
    paths = write_plots(*build([("pruned", 1), ("pruned", 3), ("failed", 2)]), tmp_path)
    assert paths == [tmp_path / "learning_curves.png"]
    assert_png(paths[0])
    _, nothing = build([("failed", 0)])
    assert write_plots(None, nothing, tmp_path / "none") == []


@pytest.mark.parametrize(
    ("plan", "plots"),
    [
        ([("pruned", 1), ("pruned", 3), ("failed", 2)], ["learning_curves"]),
        ([("completed", 2), ("pruned", 1)], ["optimization_history", "learning_curves"]),
        ([("failed", 0)], []),
        (PLAN, list(PLOTS)),
    ],
    ids=["no-complete-trial", "one-complete-trial", "no-epoch", "normal"],
)
def test_only_what_the_trials_allow_is_drawn(plan, plots):
    study, summary = build(plan)
    assert drawable(study, summary) == plots
    assert drawable(None, summary) == (["learning_curves"] if "learning_curves" in plots else [])


def test_a_metric_that_never_varies_has_no_importances():
    study, summary = build([("completed", 2), ("completed", 3)])
    assert "param_importances" in drawable(study, summary)
    flat = optuna.create_study(direction="maximize")
    for trial in study.trials:
        flat.add_trial(optuna.trial.create_trial(params=trial.params, distributions=trial.distributions, value=0.5))
    assert importances(flat) == {}
    assert drawable(flat, summary) == ["optimization_history", "parallel_coordinate", "slice", "learning_curves"]
