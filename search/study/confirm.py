"""--confirm K: once the search ends, its K best configurations are retrained with more seeds, and the winner
is the one with the best mean score.

On small data a single run's ranking is noise: the trial that came first may only have drawn a lucky seed.
The candidates come from the study's MLflow record, where every search trial's run holds its configuration and
its best score, whichever Tune run trained it (an extended study's earlier searches too). The retrains are a
Tune run of their own (search.study.tuning.make_confirm_tuner); their runs are children of the study's run,
named "t07 seed 1" and tagged role=confirm, and their scores are read back from there. The recipe trial (t00) is
confirmed beside the K best, with the same seeds, so that the winner's gain over it is measured across seeds
(search.study.gain); it may win.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import yaml
from mlflow.tracking import MlflowClient

from search.records.study_config import CONFIRM_DIR, StudyConfig
from search.tracking.schema import (
    CONFIRM_ROLE,
    PARENT_TAG,
    RECIPE_TAG,
    ROLE_TAG,
    STATUS_TAG,
    TRIAL_CONFIG,
    TRIAL_LABEL_TAG,
    TUNE_RUN_TAG,
)
from search.tracking.store import read_artifact
from trainables.config import SEED, improves

CONFIRM_TABLE = "confirm.md"
"""The confirmation's table, on the study's run."""
WINNER_TAG = "confirmed_winner"


@dataclass(frozen=True)
class Candidate:
    """A search trial among the K best: its name (t07), its configuration and its best score."""

    label: str
    config: dict
    score: float
    recipe: bool = False
    """It is the recipe trial (t00), confirmed beside the K best so that the winner's gain over it is measured
    with the same seeds."""


@dataclass(frozen=True)
class Retrain:
    """One retrain of a candidate's configuration with another seed: a trial of the confirmation's Tune run."""

    label: str
    """Its run's name: "t07 seed 1"."""
    config: dict
    """The candidate's configuration, the seed in it (trainables.config.SEED)."""
    recipe: bool = False
    """A retrain of the recipe's configuration."""


@dataclass(frozen=True)
class Confirmed:
    """A candidate's scores: its search trial's first, then its retrains' (a failed retrain has none)."""

    label: str
    scores: tuple[float, ...]
    recipe: bool = False
    """The recipe's configuration (Candidate.recipe)."""

    @property
    def mean(self) -> float:
        return statistics.fmean(self.scores)

    @property
    def sd(self) -> float:
        """The sample standard deviation; 0 for a single score."""
        return statistics.stdev(self.scores) if len(self.scores) > 1 else 0.0


def confirm_run(config: StudyConfig) -> str:
    """The confirmation's Tune run, as its runs' tune_run tag: confirm, or trials-31-50/confirm after an
    extension."""
    return "/".join((*config.search_part, CONFIRM_DIR))


def retrain_label(label: str, seed: int) -> str:
    return f"{label} seed {seed}"


def retrained_trial(label: str) -> str:
    """The search trial a retrain's label names ("t07 seed 1" -> "t07")."""
    return label.split(" seed ", 1)[0]


def confirm_seeds(config: StudyConfig) -> range:
    """The seeds each candidate is retrained with: those after the study's (seed+1 ... seed+S)."""
    return range(config.seed + 1, config.seed + 1 + config.confirm_seeds)


def candidates(client: MlflowClient, experiment_id: str, parent_id: str, config: StudyConfig) -> list[Candidate]:
    """The study's `config.confirm` best search trials that completed their budget, best first, then the recipe
    trial where it is not among them (a study without one: none).

    ASHA-stopped trials are left out: an early score is no final one, and a confirmation repeats
    the whole budget."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}' and tags.{STATUS_TAG} = 'completed'",
        max_results=50_000,
    )
    best_key = f"best_{config.metric}"
    searched = [run for run in runs if run.data.tags.get(ROLE_TAG) != CONFIRM_ROLE and best_key in run.data.metrics]
    ranked = sorted(searched, key=lambda run: run.data.metrics[best_key], reverse=config.mode == "max")
    chosen = ranked[: config.confirm]
    chosen += [run for run in ranked[config.confirm :] if run.data.tags.get(RECIPE_TAG) == "true"][:1]
    return [
        Candidate(
            label=run.data.tags[TRIAL_LABEL_TAG],
            config=yaml.safe_load(read_artifact(client, run.info.run_id, TRIAL_CONFIG) or "{}"),
            score=run.data.metrics[best_key],
            recipe=run.data.tags.get(RECIPE_TAG) == "true",
        )
        for run in chosen
    ]


def plan_retrains(chosen: list[Candidate], config: StudyConfig) -> list[Retrain]:
    """Each candidate with each of the seeds after the study's (seed+1 ... seed+S), candidate by candidate."""
    seeds = confirm_seeds(config)
    return [
        Retrain(retrain_label(candidate.label, seed), {**candidate.config, SEED: seed}, candidate.recipe)
        for candidate in chosen
        for seed in seeds
    ]


def confirmed_scores(
    client: MlflowClient, experiment_id: str, parent_id: str, config: StudyConfig, chosen: list[Candidate]
) -> list[Confirmed]:
    """Each candidate's search score and its retrains' best scores, read from their runs."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}' and tags.{TUNE_RUN_TAG} = '{confirm_run(config)}'",
        max_results=50_000,
    )
    best_key = f"best_{config.metric}"
    retrained = {run.data.tags.get(TRIAL_LABEL_TAG): run.data.metrics.get(best_key) for run in runs}
    seeds = confirm_seeds(config)
    return [
        Confirmed(
            candidate.label,
            (
                candidate.score,
                *(
                    score
                    for seed in seeds
                    if (score := retrained.get(retrain_label(candidate.label, seed))) is not None
                    and math.isfinite(score)
                ),
            ),
            candidate.recipe,
        )
        for candidate in chosen
    ]


def confirmed_winner(confirmed: list[Confirmed], mode: str) -> Confirmed:
    """The best mean; on a tie, the earlier (better-searched) candidate."""
    winner = confirmed[0]
    for other in confirmed[1:]:
        if improves(mode, other.mean, winner.mean):
            winner = other
    return winner


def confirm_table(confirmed: list[Confirmed], winner: Confirmed, config: StudyConfig) -> str:
    """The confirmation as Markdown: a row per candidate, its search score, each seed's, the mean and spread."""
    seeds = [f"seed {seed}" for seed in confirm_seeds(config)]
    header = ["trial", f"search ({config.metric})", *seeds, "mean", "sd", ""]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in confirmed:
        retrains = [f"{score:.4f}" for score in row.scores[1:]] + ["failed"] * (len(seeds) + 1 - len(row.scores))
        mark = ", ".join(name for name, marked in (("winner", row is winner), ("recipe", row.recipe)) if marked)
        cells = [row.label, f"{row.scores[0]:.4f}", *retrains, f"{row.mean:.4f}", f"{row.sd:.4f}", mark]
        lines.append("| " + " | ".join(cells) + " |")
    return (
        f"Confirmation of study {config.name}: its {confirmed_what(confirmed, config)}, each retrained with "
        f"{config.confirm_seeds} more seed(s) at the full budget of {config.epochs} epochs; the winner has the best "
        f"mean {config.metric}.\n\n" + "\n".join(lines) + "\n"
    )


def confirmed_what(rows: list[Confirmed] | list[Candidate], config: StudyConfig) -> str:
    """'2 best configuration(s)', or '2 best configuration(s) and the recipe (t00)' where the recipe was added to
    them (candidates)."""
    best, added = rows[: config.confirm], rows[config.confirm :]
    return f"{len(best)} best configuration(s)" + "".join(f" and the recipe ({row.label})" for row in added)


def log_confirmation(
    client: MlflowClient, parent_id: str, confirmed: list[Confirmed], winner: Confirmed, config: StudyConfig
) -> None:
    """The table, and the winner's mean and spread as metrics, on the study's run."""
    client.log_text(parent_id, confirm_table(confirmed, winner, config), CONFIRM_TABLE)
    client.set_tag(parent_id, WINNER_TAG, winner.label)
    client.log_metric(parent_id, f"confirmed_mean_{config.metric}", winner.mean)
    client.log_metric(parent_id, f"confirmed_sd_{config.metric}", winner.sd)
    client.log_metric(parent_id, "confirmed_runs", len(winner.scores))
