"""The recipe as the study's baseline: how far the winner got beyond it, and what the search cost in recipe trainings.

Every study (unless --no-recipe) trains the knobs' defaults first, as trial t00, to its whole budget. Its best
score, taken as every trial's is, is what the winner's gain is measured against; with --confirm, the recipe is
retrained with the same seeds as the confirmed configurations, and the gain is the difference of their means.
The compute is every trial's compute_epochs (full-resolution epochs of the train split, trainables.fidelity)
summed, and said as recipe trainings: one is --epochs full-resolution epochs.

Pure: everything comes from a StudySummary (search.study.report), so that the closing lines, the note and the
metrics of the study's run say the same numbers.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import TYPE_CHECKING

from search.study.confirm import retrained_trial
from search.tracking.schema import COMPUTE_VS_RECIPE, GAIN_METRIC, RECIPE_METRIC_PREFIX
from trainables.fidelity import COMPUTE_EPOCHS

if TYPE_CHECKING:
    from search.study.pareto import Point
    from search.study.report import StudySummary, TrialSummary

SEARCH_SEED = "search"
"""A confirmed configuration's search trial, among its seeds: every configuration's ran with the study's seed."""


@dataclass(frozen=True)
class Gain:
    """The winner against the recipe: by their search trials' best scores, or (`paired` given) by their means over
    the confirmation's seeds, with the per-seed paired differences."""

    metric: str
    mode: str
    winner: str
    """The winner's search trial (t07)."""
    winner_score: float
    recipe: str
    """The recipe trial (t00)."""
    recipe_score: float
    paired: tuple[float, ...] = ()
    """Per seed both were trained with (the confirmation's), the winner's score minus the recipe's, signed as
    `value`; empty without a confirmation."""

    @property
    def value(self) -> float:
        """The winner's score minus the recipe's, signed so that a positive gain is better (val_loss: the other
        way round)."""
        return signed(self.mode, self.winner_score - self.recipe_score)

    @property
    def recipe_won(self) -> bool:
        return self.winner == self.recipe

    def line(self) -> str:
        """'best t07 val_acc 0.9405, +0.74 points over the recipe (t00 0.9331)', or that the recipe won."""
        if not self.paired:
            if self.recipe_won:
                return (
                    f"the recipe {self.recipe} is the best trial ({self.metric} {self.recipe_score:.4f}); "
                    f"the search found nothing better"
                )
            return (
                f"best {self.winner} {self.metric} {self.winner_score:.4f}, {amount(self.mode, self.value)} "
                f"the recipe ({self.recipe} {self.recipe_score:.4f})"
            )
        if self.recipe_won:
            return (
                f"the recipe {self.recipe} has the best mean {self.metric} over the seeds ({self.recipe_score:.4f}); "
                f"the search found nothing better"
            )
        spread = f"per seed {span(self.mode, self.paired)}, {len(self.paired)} seeds"
        return (
            f"confirmed {self.winner} mean {self.metric} {self.winner_score:.4f}, "
            f"{amount(self.mode, self.value)} the recipe's ({self.recipe} {self.recipe_score:.4f}; "
            f"{spread})"
        )


def recipe_trial(summary: StudySummary) -> TrialSummary | None:
    """The study's recipe trial (t00), where it ran one and it reported a score."""
    return next((trial for trial in summary.trials if trial.recipe and trial.best(summary.mode) is not None), None)


def search_gain(summary: StudySummary) -> Gain | None:
    """The winner's best score against the recipe's; None without a recipe trial or a winner, or in a
    multi-objective study (its winner is one point of a front)."""
    recipe, winner = recipe_trial(summary), summary.best_trial
    if recipe is None or winner is None or summary.tradeoff is not None:
        return None
    recipe_best, winner_best = recipe.best(summary.mode), winner.best(summary.mode)
    if recipe_best is None or winner_best is None:
        return None
    return Gain(summary.metric, summary.mode, winner.label, winner_best[1], recipe.label, recipe_best[1])


def confirmed_gain(summary: StudySummary) -> Gain | None:
    """The confirmed winner's mean over its seeds against the recipe's (the search trial's score and the
    retrains'); None without a confirmation of both."""
    recipe, winner = recipe_trial(summary), summary.best_trial
    if recipe is None or winner is None or summary.tradeoff is not None or not summary.retrains:
        return None
    recipe_scores, winner_scores = seed_scores(summary, recipe), seed_scores(summary, winner)
    if len(recipe_scores) < 2 or len(winner_scores) < 2:  # the recipe was not confirmed (or every retrain failed)
        return None
    both = [seed for seed in winner_scores if seed in recipe_scores]
    return Gain(
        summary.metric,
        summary.mode,
        winner.label,
        statistics.fmean(winner_scores.values()),
        recipe.label,
        statistics.fmean(recipe_scores.values()),
        tuple(signed(summary.mode, winner_scores[seed] - recipe_scores[seed]) for seed in both),
    )


def seed_scores(summary: StudySummary, trial: TrialSummary) -> dict[str, float]:
    """A search trial's best score and its retrains' ("t07 seed 1"), by seed."""
    scores = {}
    for run in (trial, *(retrain for retrain in summary.retrains if retrained_trial(retrain.label) == trial.label)):
        best = run.best(summary.mode)
        if best is not None:
            scores[SEARCH_SEED if run is trial else run.label.split(" seed ", 1)[-1]] = best[1]
    return scores


def study_gain(summary: StudySummary) -> Gain | None:
    """The gain the study reports: across seeds where it was confirmed, else by the search's scores."""
    return confirmed_gain(summary) or search_gain(summary)


def recipe_cost_line(summary: StudySummary) -> str | None:
    """A multi-objective study's recipe, simply: 't00 val_acc 0.9331, params_m 5.72'."""
    recipe = recipe_trial(summary)
    if summary.tradeoff is None or recipe is None:
        return None
    best = recipe.best(summary.mode)
    point = recipe_point(summary, recipe)
    cost = f", {summary.tradeoff.cost.metric} {point.cost:.4g}" if point is not None else ""
    return f"the recipe {recipe.label} {summary.metric} {best[1] if best else float('nan'):.4f}{cost}"


def recipe_point(summary: StudySummary, recipe: TrialSummary) -> Point | None:
    """A multi-objective study's point of the recipe trial (its score and cost), None where it has none."""
    assert summary.tradeoff is not None, "asked of a multi-objective study"
    return next((point for point in summary.tradeoff.points if point.label == recipe.label), None)


def recipe_line(summary: StudySummary) -> str | None:
    """What the closing lines and the note say of the recipe: the winner's gain over it (study_gain), or a
    multi-objective study's recipe score and cost; None without a recipe trial."""
    gain = study_gain(summary)
    return gain.line() if gain is not None else recipe_cost_line(summary)


def compute_vs_recipe(summary: StudySummary) -> float:
    """The study's compute in trainings of the recipe: compute_epochs over its budget of full-resolution epochs."""
    return summary.compute_epochs / summary.max_t


def compute_line(summary: StudySummary) -> str:
    """'41.5 full-resolution epochs, 2.8 recipe trainings'."""
    return f"{summary.compute_epochs:.1f} full-resolution epochs, {compute_vs_recipe(summary):.1f} recipe trainings"


def baseline_metrics(summary: StudySummary) -> dict[str, float]:
    """What the study's run logs of it: compute_epochs and compute_vs_recipe always; recipe_<metric> where there
    is a recipe trial (and recipe_<cost> in a multi-objective study); gain_over_recipe, and with a confirmation
    confirmed_recipe_mean_<metric>, confirmed_gain_over_recipe and the paired differences' range
    (confirmed_gain_min, confirmed_gain_max)."""
    metrics = {COMPUTE_EPOCHS: summary.compute_epochs, COMPUTE_VS_RECIPE: compute_vs_recipe(summary)}
    recipe = recipe_trial(summary)
    best = recipe.best(summary.mode) if recipe is not None else None
    if recipe is None or best is None:
        return metrics
    metrics[RECIPE_METRIC_PREFIX + summary.metric] = best[1]
    if summary.tradeoff is not None and (point := recipe_point(summary, recipe)) is not None:
        metrics[RECIPE_METRIC_PREFIX + summary.tradeoff.cost.metric] = point.cost
    if (searched := search_gain(summary)) is not None:
        metrics[GAIN_METRIC] = searched.value
    if (confirmed := confirmed_gain(summary)) is not None:
        metrics[f"confirmed_{RECIPE_METRIC_PREFIX}mean_{summary.metric}"] = confirmed.recipe_score
        metrics[f"confirmed_{GAIN_METRIC}"] = confirmed.value
        metrics["confirmed_gain_min"], metrics["confirmed_gain_max"] = min(confirmed.paired), max(confirmed.paired)
    return metrics


def signed(mode: str, difference: float) -> float:
    """A difference of scores, positive where it is better."""
    return difference if mode == "max" else -difference


def amount(mode: str, gain: float) -> str:
    """'+0.74 points over' (an accuracy-type metric: 100 x the difference), '0.0312 lower (better) than' (a loss,
    lower is better)."""
    if mode == "max":
        return f"{100 * gain:+.2f} points over"
    return f"{abs(gain):.4f} {'lower (better)' if gain >= 0 else 'higher (worse)'} than"


def span(mode: str, paired: tuple[float, ...]) -> str:
    """'+0.20 to +1.10 points' (a loss: '+0.0100 to +0.0300 lower'), the paired differences' range, positive
    where the winner is better."""
    low, high = min(paired), max(paired)
    if mode == "max":
        return f"{100 * low:+.2f} to {100 * high:+.2f} points"
    return f"{low:+.4f} to {high:+.4f} lower"
