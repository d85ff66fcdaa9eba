"""Trials that never left chance: found on the scores, their likely cause named from what set them apart."""

from __future__ import annotations

import pytest

from search.study.chance import at_chance, chance_bar
from search.study.report import StudySummary, TrialSummary

CHANCE = 1 / 11


def trial(label: str, scores: list[float], outcome: str = "completed", **params) -> TrialSummary:
    return TrialSummary(label, outcome, params, tuple(enumerate(scores, start=1)))


def study(*trials: TrialSummary, metric: str = "val_acc", pretrained: bool = False, **sizes) -> StudySummary:
    return StudySummary(
        name="smoke",
        model="cnn",
        metric=metric,
        mode="min" if metric == "val_loss" else "max",
        max_t=3,
        grace_period=2,
        reduction_factor=3,
        num_classes=11,
        planned_trials=len(trials),
        elapsed_s=130.0,
        trials=trials,
        pretrained=pretrained,
        **{"train_images": 264, "val_images": 88, **sizes},
    )


def test_the_readme_smoke_study_names_its_trials_at_batch_32_and_their_too_few_steps():
    # What the README's first command gives (cnn, --no-pretrained, synthetic, 32 px, 3 epochs, 264 train images).
    summary = study(
        trial("t00", [0.0909, 0.0909, 0.4205], lr=6.47e-4, batch_size=16),
        trial("t01", [0.0909, 0.0909, 0.0909], lr=6.9e-4, batch_size=32),
        trial("t02", [0.0909, 0.0909, 0.0909], lr=1.5e-4, batch_size=32),
        trial("t03", [0.0909, 0.25, 0.4205], lr=8.02e-4, batch_size=16),
    )
    found = at_chance(summary)
    assert found is not None
    assert [t.label for t in found.trials] == ["t01", "t02"]
    line = found.line(summary)
    assert line.startswith(
        "t01, t02 never left chance (val_acc stayed at or below 0.1522 in every epoch; chance 0.0909)"
    )
    assert "27 optimizer steps, the trials that learnt 51" in line  # 3 x ceil(264 / 32), 3 x ceil(264 / 16)
    assert "--no-pretrained" in line and "--epochs" in line and "batch_size" in line
    assert "\n" not in line


def test_a_study_whose_trials_all_learnt_says_nothing():
    summary = study(trial("t00", [0.3, 0.5], lr=1e-3, batch_size=16), trial("t01", [0.2], lr=1e-4, batch_size=16))
    assert at_chance(summary) is None


def test_a_score_within_noise_of_chance_is_still_chance_but_one_above_it_is_not():
    bar = chance_bar("val_acc", 11, 88)
    assert bar == pytest.approx(CHANCE + 2 * (CHANCE * (1 - CHANCE) / 88) ** 0.5)
    summary = study(trial("t00", [bar - 0.01], lr=1e-3), trial("t01", [bar + 0.01], lr=1e-4))
    found = at_chance(summary)
    assert found is not None and [t.label for t in found.trials] == ["t00"]


def test_with_equal_steps_the_higher_learning_rate_is_named():
    summary = study(
        trial("t00", [0.09, 0.09], lr=2.5e-3, batch_size=32),
        trial("t01", [0.3, 0.6], lr=3e-4, batch_size=32),
        trial("t02", [0.2, 0.5], lr=1e-4, batch_size=32),
    )
    found = at_chance(summary)
    assert found is not None
    assert "their lr (0.0025) was above that of every trial that learnt (0.0001 to 0.0003)" in found.line(summary)


def test_when_no_trial_learnt_the_budget_and_the_labels_are_the_suspects():
    summary = study(trial("t00", [0.09, 0.09], lr=1e-3), trial("t01", [0.08, 0.09], lr=1e-4), pretrained=True)
    found = at_chance(summary)
    assert found is not None and len(found.trials) == 2
    assert "no trial learnt anything in 3 epoch(s)" in found.cause and "label" in found.cause
    assert "--no-pretrained" not in found.cause


def test_a_loss_study_leaves_chance_below_the_uniform_guess_s_loss():
    uniform = 2.3979  # ln 11
    summary = study(
        trial("t00", [2.41, 2.40], lr=1e-3, batch_size=16), trial("t01", [2.0, 1.2], lr=1e-3, batch_size=16),
        metric="val_loss",
    )  # fmt: skip
    found = at_chance(summary)
    assert found is not None and [t.label for t in found.trials] == ["t00"]
    assert f"stayed above {0.95 * uniform:.4f}" in found.line(summary)


def test_trials_without_a_result_are_not_counted():
    summary = study(trial("t00", [], outcome="failed"), trial("t01", [0.5], lr=1e-3))
    assert at_chance(summary) is None
