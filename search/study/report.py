"""What a person reads on a finished (or resumed) study's MLflow run: a note in Markdown and a few plots.

The caller gathers the trials from MLflow and the Optuna storage into a `StudySummary`
and logs what these functions return; nothing here talks to Ray or MLflow, so every
piece can be checked on a study built in memory.
"""

from __future__ import annotations

import math
import re
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import optuna
from optuna.importance import FanovaImportanceEvaluator
from optuna.trial import FrozenTrial, TrialState

from search.records.trial_status import TrialStatus
from search.records.winner import Winner
from search.study.chance import at_chance, chance_level
from search.study.gain import compute_line, recipe_line
from search.study.pareto import Tradeoff, front_markdown

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

OUTCOMES = tuple(status.value for status in TrialStatus)
"""How a trial stands; the first three are always counted, the others only when they occur."""
ALWAYS_COUNTED = OUTCOMES[:3]
TOP_TRIALS = 5
IMPORTANCE_SEED = 0
"""Seeds fANOVA's random forest: the same study gives the same importances every time."""
DPI = 120
TIE_RULE = "a tie goes to the earliest trial"
"""How the study's winner is chosen among trials with the same best score: the lowest trial number (an extended
study's earlier winner stays too). The driver's export (best_checkpoint) and ranked() follow it."""


@dataclass(frozen=True)
class TrialSummary:
    """One trial as its MLflow run shows it."""

    label: str
    """Its short name in MLflow ('t07'): the Optuna trial number, zero-padded."""
    outcome: str
    """One of OUTCOMES."""
    params: dict[str, Any]
    """The sampled hyperparameters."""
    curve: tuple[tuple[int, float], ...]
    """(epoch, metric value) per epoch reported, epochs from 1, in order."""
    trial_id: str = ""
    """Ray's trial id: what the winner record names (its `trial_id`)."""
    run_id: str = ""
    """Its MLflow run."""
    recipe: bool = False
    """It trained the recipe (the knobs' defaults): the study's t00, or a confirmation's retrain of it."""

    def __post_init__(self) -> None:
        if self.outcome not in OUTCOMES:
            raise ValueError(f"trial {self.label}: outcome {self.outcome!r} is not one of {', '.join(OUTCOMES)}")
        epochs = [epoch for epoch, _ in self.curve]
        if any(epoch < 1 for epoch in epochs) or epochs != sorted(set(epochs)):
            raise ValueError(f"trial {self.label}: curve epochs {epochs} are not increasing from 1")

    def best(self, mode: str) -> tuple[int, float] | None:
        """(epoch, value) of the best epoch, the last of equals: the checkpoint Ray keeps of a trial (among equal
        scores, the newer), whose epoch the winner record gives; None before any result. NaN epochs never win."""
        points = [(epoch, value) for epoch, value in self.curve if not math.isnan(value)]
        if not points:
            return None
        sign = 1.0 if mode == "max" else -1.0
        return max(points, key=lambda point: (sign * point[1], point[0]))

    @property
    def epochs(self) -> int:
        """The last epoch it reported (0: none)."""
        return self.curve[-1][0] if self.curve else 0


@dataclass(frozen=True)
class StudySummary:
    """A study as the report needs it: its settings and every trial."""

    name: str
    """The study's name (its MLflow parent run, its Ray folder, what final.py --study takes)."""
    model: str
    metric: str
    """What the search optimised: one of METRIC_MODES."""
    mode: str
    """'max' or 'min': which way the metric improves."""
    max_t: int
    """ASHA's max_t: the epoch budget of a trial."""
    grace_period: int
    """ASHA's grace period as the scheduler got it (at most max_t)."""
    reduction_factor: int
    num_classes: int
    """Classes in the data: what guessing scores depends on it."""
    planned_trials: int
    """Trials the study was asked for (--trials)."""
    elapsed_s: float
    """Wall-clock seconds the search ran, over every session of a resumed study."""
    trials: tuple[TrialSummary, ...]
    """Every trial that started, in order."""
    winner_id: str = ""
    """Ray's trial id of the study's winner (the one final.py retrains); empty: the best by the curves. A confirmed
    winner is named by its search trial."""
    retrains: tuple[TrialSummary, ...] = ()
    """A confirmation's retrains of the best configurations with other seeds (--confirm), apart from the trials."""
    tradeoff: Tradeoff | None = None
    """A multi-objective study's trials as metric against cost, with its Pareto front; None for one objective.
    Such a study has no ASHA: its trials stop themselves (early_stop_patience) or at the budget."""
    train_images: int = 0
    """Images of the train split a trial trains on each epoch (0: not known)."""
    val_images: int = 0
    """Images of the val split a trial is scored on (0: not known)."""
    pretrained: bool = True
    """The trials started from pretrained backbones (False: random weights, --no-pretrained)."""
    compute_epochs: float = 0.0
    """What every trial the study trained cost, search and confirmation, in full-resolution epochs (the sum of
    their last compute_epochs; search.study.gain)."""

    def __post_init__(self) -> None:
        if self.mode not in ("max", "min"):
            raise ValueError(f"mode {self.mode!r}: use 'max' or 'min'")

    def ranked(self) -> list[TrialSummary]:
        """Trials with a result, best first, equals earliest first (TIE_RULE): Ray's scope='all', every epoch of
        every trial."""
        sign = -1.0 if self.mode == "max" else 1.0
        scored = [(trial, best) for trial in self.trials if (best := trial.best(self.mode)) is not None]
        ranked = sorted(scored, key=lambda item: (sign * item[1][1], trial_order(item[0].label)))
        return [trial for trial, _ in ranked]

    @property
    def best_trial(self) -> TrialSummary | None:
        """The winner: the trial Ray named, else the first of ranked()."""
        named = [trial for trial in self.trials if self.winner_id and trial.trial_id == self.winner_id]
        ranked = named or self.ranked()
        return ranked[0] if ranked else None

    @property
    def rungs(self) -> list[int]:
        """ASHA's rungs below the budget; none in a multi-objective study, which ran without ASHA."""
        if self.tradeoff is not None:
            return []
        return asha_rungs(self.grace_period, self.reduction_factor, self.max_t)

    @property
    def chance(self) -> float:
        return chance_level(self.metric, self.num_classes)


def trial_order(label: str) -> tuple[int, ...]:
    """Where a trial stands in its study, from its name: t07 -> (7,), a confirmation's "t07 seed 2" -> (7, 2).
    By number, not by text: an extended study's names grow wider (t99, then t100)."""
    return tuple(int(number) for number in re.findall(r"\d+", label))


def tied_best(summary: StudySummary) -> list[TrialSummary]:
    """The trials that share the winner's best score, the winner first (TIE_RULE); [] where no other trial has it,
    or where a confirmation chose the winner (by its retrains' mean, not by this score)."""
    winner = summary.best_trial
    best = winner.best(summary.mode) if winner is not None else None
    if best is None or summary.retrains:
        return []
    tied = [trial for trial in summary.ranked() if (trial.best(summary.mode) or (0, math.nan))[1] == best[1]]
    return tied if len(tied) > 1 and tied[0] is winner else []


def tie_line(summary: StudySummary) -> str | None:
    """'Tie: t00 and t03 both reached val_acc 0.4205; t00 won: a tie goes to the earliest trial.', or None."""
    tied = tied_best(summary)
    if not tied:
        return None
    names = [trial.label for trial in tied]
    listed = f"{', '.join(names[:-1])} and {names[-1]}"
    each = "both" if len(names) == 2 else "all"
    value = (tied[0].best(summary.mode) or (0, math.nan))[1]
    return f"Tie: {listed} {each} reached {summary.metric} {value:.4f}; {names[0]} won: {TIE_RULE}."


def asha_rungs(grace_period: int, reduction_factor: int, max_t: int) -> list[int]:
    """The epochs at which Ray's ASHAScheduler compares a trial with the others, ascending.

    Ray's bracket keeps rungs at grace_period * reduction_factor**k up to max_t included,
    but a result at max_t stops the trial before the bracket is asked (stop_last_trials),
    so a rung at max_t decides nothing: only those below it are comparisons.
    """
    if grace_period < 1 or reduction_factor < 2:
        raise ValueError(
            f"ASHA needs grace_period >= 1 and reduction_factor >= 2, not {grace_period} and {reduction_factor}"
        )
    rungs, rung = [], grace_period
    while rung < max_t:
        rungs.append(rung)
        rung *= reduction_factor
    return rungs


def outcome_counts(trials: Iterable[TrialSummary]) -> dict[str, int]:
    """Trials per outcome: completed, pruned and failed always (0 included), then any other that occurs."""
    counts = Counter(trial.outcome for trial in trials)
    return {outcome: counts[outcome] for outcome in OUTCOMES if outcome in ALWAYS_COUNTED or counts[outcome]}


# ---------------------------------------------------------------- parameter importances


def scored_trials(study: optuna.Study | None) -> list[FrozenTrial]:
    """The study's COMPLETE trials with a finite value: what Optuna's plots and importances use."""
    if study is None:
        return []
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return [trial for trial in trials if trial.value is not None and math.isfinite(trial.value)]


def varying_params(trials: Sequence[FrozenTrial]) -> list[str]:
    """Parameters every trial has, with one distribution, that take more than one value among them."""
    if not trials:
        return []
    first = trials[0]
    return [
        name
        for name, distribution in first.distributions.items()
        if all(trial.distributions.get(name) == distribution for trial in trials)
        and not distribution.single()
        and len({repr(trial.params[name]) for trial in trials}) > 1
    ]


def importances(study: optuna.Study | None) -> dict[str, float]:
    """Each varying parameter's share of the metric's variance over the COMPLETE trials, summing to 1, largest first.

    {} when there is nothing to explain: no study, fewer than 2 completed trials, no parameter that
    varies among them, or one metric value for all.
    """
    params = explained_params(scored_trials(study))
    if study is None or not params:
        return {}
    try:
        return optuna.importance.get_param_importances(study, evaluator=importance_evaluator(), params=params)
    except RuntimeError:  # fANOVA's forest found no variance it could split on: nothing to say either
        return {}


def explained_params(trials: Sequence[FrozenTrial]) -> list[str]:
    """The parameters whose importance can be measured: those that vary, when the metric varies too; else []."""
    if len({trial.value for trial in trials}) < 2:
        return []
    return varying_params(trials)


def importance_evaluator() -> FanovaImportanceEvaluator:
    # fANOVA, not Optuna 5's default PED-ANOVA: PED-ANOVA asks what it takes to reach the top 10% of
    # trials and wants 5 trials up there (50 completed), more than a study of a few dozen mostly
    # pruned trials has. fANOVA's random forest explains the variance of all the completed trials,
    # and takes a seed. It needs scikit-learn, a dependency of this project already.
    return FanovaImportanceEvaluator(seed=IMPORTANCE_SEED)


# ---------------------------------------------------------------- the note


def describe(summary: StudySummary, winner: Winner | None, knobs: dict[str, Any]) -> str:
    """The Markdown note of the study's MLflow run: headline, counts, time, top trials, winner, how to retrain.

    `winner` is the study's winner (its trial, metric, best value and epoch), None when no trial
    produced a result; `knobs` is the winning configuration, already limited to the model's knobs.
    """
    chance = summary.chance
    if winner is None:
        headline = f"Study {summary.name}: no trial produced a result (chance {summary.metric} {chance:.4f})."
    else:
        headline = (
            f"best {winner.metric} {winner.best_value:.4f} (chance {chance:.4f}), "
            f"trial {winner_label(summary, winner)} at epoch {winner.best_epoch}"
        )
    lines = [headline]
    if winner is not None and (tie := tie_line(summary)):
        lines += ["", tie]
    recipe = recipe_line(summary) if winner is not None else None
    if recipe:
        lines += ["", recipe[0].upper() + recipe[1:] + "."]
    stuck = at_chance(summary)
    if stuck is not None:
        lines += ["", stuck.line(summary)]
    lines += ["", f"{counts_line(summary)}; elapsed {duration(summary.elapsed_s)}.", "", asha_line(summary)]
    lines += ["", f"Compute: {compute_line(summary)}."]
    ranked = summary.ranked()
    if ranked:
        lines += ["", f"## Top {min(TOP_TRIALS, len(ranked))} trials", "", *top_table(summary)]
    if summary.tradeoff is not None and summary.tradeoff.points:
        lines += ["", *front_markdown(summary.tradeoff, summary.name)]
    if winner is None:
        lines += ["", "Nothing to retrain: see the failed trial runs for their errors."]
    else:
        if knobs:
            lines += ["", "## Winning configuration", "", "| knob | value |", "| --- | --- |"]
            lines += [f"| {cell(name)} | {cell(shown(value))} |" for name, value in knobs.items()]
        lines += [
            "",
            "## Retrain",
            "",
            "Retrain the winner on train+val and test it once on the held-out split:",
            "",
            f"    python search/final.py --study {summary.name}",
        ]
    return "\n".join(lines) + "\n"


def winner_label(summary: StudySummary, winner: Winner) -> str:
    """The winner's name (t07) as its record gives it; for a record older than the name, its trial's by Ray's id."""
    return winner.trial or label_of(summary, winner.trial_id or "")


def label_of(summary: StudySummary, trial_id: str) -> str:
    """The MLflow label of the trial Ray calls `trial_id`; the id itself when no summary has it."""
    return next((trial.label for trial in (*summary.trials, *summary.retrains) if trial.trial_id == trial_id), trial_id)


def counts_line(summary: StudySummary) -> str:
    ran = len(summary.trials)
    parts = ", ".join(f"{count} {outcome}" for outcome, count in outcome_counts(summary.trials).items() if count)
    if ran < summary.planned_trials:
        return f"{ran} of {summary.planned_trials} planned trials ran: {parts or 'none'}"
    return f"{ran} trials: {parts}"


def asha_line(summary: StudySummary) -> str:
    if summary.tradeoff is not None:
        return (
            f"No ASHA (a multi-objective study: ASHA ranks {summary.metric} alone and would stop the cheap trials "
            f"of the front): each trial stopped itself after early_stop_patience epochs without improvement, "
            f"or at the {summary.max_t}-epoch budget."
        )
    rungs = summary.rungs
    where = f"compared trials at epoch{'s' if len(rungs) > 1 else ''} {', '.join(map(str, rungs))}" if rungs else ""
    return (
        f"ASHA (grace period {summary.grace_period}, reduction factor {summary.reduction_factor}) "
        f"{where or 'had no rung below the budget'} of a {summary.max_t}-epoch budget."
    )


def duration(seconds: float) -> str:
    """'42 s', '3 min 05 s', '1 h 02 min 05 s'."""
    total = round(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes:02d} min {secs:02d} s"
    if minutes:
        return f"{minutes} min {secs:02d} s"
    return f"{secs} s"


def top_table(summary: StudySummary) -> list[str]:
    """The best TOP_TRIALS trials as a Markdown table, with the parameters that differ between trials."""
    varying = [
        name
        for name in dict.fromkeys(name for trial in summary.trials for name in trial.params)
        if len({repr(trial.params.get(name)) for trial in summary.trials}) > 1
    ]
    header = ["trial", "outcome", f"best {summary.metric}", "at epoch", "epochs run", *varying]
    rows = [header, ["---"] * len(header)]
    for trial in summary.ranked()[:TOP_TRIALS]:
        epoch, value = trial.best(summary.mode) or (0, math.nan)
        rows.append(
            [
                trial.label,
                trial.outcome,
                f"{value:.4f}",
                str(epoch),
                f"{trial.epochs}/{summary.max_t}",
                *(shown(trial.params[name]) if name in trial.params else "–" for name in varying),
            ]
        )
    return ["| " + " | ".join(cell(text) for text in row) + " |" for row in rows]


def shown(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def cell(text: str) -> str:
    return text.replace("|", "\\|")


# ---------------------------------------------------------------- the plots

OUTCOME_STYLES: dict[str, dict[str, Any]] = {
    TrialStatus.COMPLETED: {"color": "tab:blue", "linestyle": "-", "alpha": 0.8, "linewidth": 1.4},
    TrialStatus.PRUNED: {"color": "grey", "linestyle": "--", "alpha": 0.6, "linewidth": 1.0},
    TrialStatus.FAILED: {"color": "tab:red", "linestyle": "-", "alpha": 0.8, "linewidth": 1.2},
    TrialStatus.INTERRUPTED: {"color": "tab:orange", "linestyle": ":", "alpha": 0.8, "linewidth": 1.2},
    TrialStatus.LOST: {"color": "tab:orange", "linestyle": ":", "alpha": 0.8, "linewidth": 1.2},
    TrialStatus.RUNNING: {"color": "tab:orange", "linestyle": ":", "alpha": 0.8, "linewidth": 1.2},
}
WINNER_STYLE: dict[str, Any] = {"color": "tab:green", "linestyle": "-", "linewidth": 2.8, "alpha": 1.0}


PLOTS = ("optimization_history", "param_importances", "parallel_coordinate", "slice", "learning_curves")
"""Every plot of a study, in reading order; the file of each is <name>.png."""


def drawable(study: optuna.Study | None, summary: StudySummary) -> list[str]:
    """The plots there is something to draw for, in reading order.

    The optimization history needs a completed trial; importances, parallel coordinates and
    slices compare trials along the parameters, so they need two completed trials and a
    parameter that varies between them (importances a metric that varies too: one trial's
    parallel coordinates are a single line on axes that each span one value); the learning
    curves need one reported epoch, and not the Optuna study (it may be None).
    """
    scored = scored_trials(study)
    compared = bool(varying_params(scored))
    can = {
        "optimization_history": bool(scored),
        "param_importances": bool(explained_params(scored)),
        "parallel_coordinate": compared,
        "slice": compared,
        "learning_curves": any(trial.curve for trial in summary.trials),
    }
    return [name for name in PLOTS if can[name]]


def write_plots(study: optuna.Study | None, summary: StudySummary, folder: Path) -> list[Path]:
    """The `drawable` plots as PNG files in `folder`, in reading order."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window: chosen before pyplot loads, so pyplot loads here
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    # Optuna's plots switch to ggplot with plt.style.use, for good: the context puts the caller's style back,
    # and gives the learning curves the same look.
    with plt.style.context("ggplot"), warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        for name in drawable(study, summary):
            if name == "learning_curves":
                figure = learning_curves(summary, plt)
            else:
                assert study is not None  # only the learning curves are drawn without one
                try:
                    figure = optuna_figure(name, study, summary.metric)
                except RuntimeError:
                    if name != "param_importances":
                        raise
                    continue  # fANOVA found no variance to split on (see importances), before making a figure
            written.append(saved(figure, folder / f"{name}.png", plt))
    return written


def optuna_figure(name: str, study: optuna.Study, metric: str) -> Figure:
    """One of Optuna's plots, sized for its parameters and made readable."""
    from optuna.visualization import matplotlib as optuna_plots

    scored = scored_trials(study)
    varying = varying_params(scored)
    size: tuple[float, float] | None = None  # None: Optuna's own (it sizes slices per parameter)
    drawn: Axes | np.ndarray
    if name == "optimization_history":
        drawn = optuna_plots.plot_optimization_history(study, target_name=metric)
    elif name == "param_importances":
        explained = explained_params(scored)
        drawn = optuna_plots.plot_param_importances(
            study, evaluator=importance_evaluator(), params=explained, target_name=metric
        )
        size = (7.0, max(3.0, 0.5 * len(explained) + 1.5))
    elif name == "parallel_coordinate":
        drawn = optuna_plots.plot_parallel_coordinate(study, varying, target_name=metric)
        # Optuna draws it at matplotlib's default size, however many parameters: give each axis room.
        size = (max(6.4, 1.6 * (len(varying) + 1)), 5.0)
    elif name == "slice":
        drawn = optuna_plots.plot_slice(study, varying, target_name=metric)
    else:
        raise ValueError(f"no Optuna plot {name!r}; Optuna's are {', '.join(PLOTS[:4])}")
    figure = figure_of(drawn)
    if size is not None:
        figure.set_size_inches(*size)
    readable(figure)
    return figure


def figure_of(axes: Axes | np.ndarray) -> Figure:
    """The figure of what an Optuna plot returns: one Axes, or an array of them (slices)."""
    first = np.ravel(axes)[0] if isinstance(axes, np.ndarray) else axes
    figure = first.get_figure()
    assert figure is not None
    return figure  # type: ignore[return-value]  # an Axes' figure is a Figure unless drawn in a SubFigure


def readable(figure: Figure) -> None:
    """Fixes to Optuna's drawings: lines that vanish, tick labels that overlap, fractional trial numbers."""
    from matplotlib.collections import LineCollection
    from matplotlib.colors import ListedColormap
    from matplotlib.ticker import MaxNLocator, NullFormatter

    for axes in figure.axes:
        if axes.get_xlabel() == "Trial":  # the optimization history of a few trials: 0, 0.2, 0.4...
            axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        for lines in axes.collections:
            if isinstance(lines, LineCollection):
                # Parallel coordinates colour by Blues, white at its light end: the worst trial's line
                # disappears on ggplot's grey. Start the light end at a pale blue instead.
                blues = lines.get_cmap()
                light_end = np.linspace(0.3, 1.0, 256) if not blues.name.endswith("_r") else np.linspace(0.0, 0.7, 256)
                lines.set_cmap(ListedColormap(blues(light_end)))
        if axes.get_xscale() == "log":
            # A log axis of one or two decades labels its minor ticks too, which collide in a slice panel:
            # keep only the powers of ten when one is in view, else turn the labels.
            low, high = sorted(axes.get_xlim())
            if math.floor(math.log10(high)) >= math.ceil(math.log10(low)):
                axes.xaxis.set_minor_formatter(NullFormatter())
            else:
                axes.tick_params(axis="x", which="minor", labelrotation=45)


def saved(figure: Figure, path: Path, plt: Any) -> Path:
    figure.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(figure)
    return path


def learning_curves(summary: StudySummary, plt: Any) -> Figure:
    """Every trial's metric per epoch, styled by outcome, the winner on top, ASHA's rungs and chance marked."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    figure, axes = plt.subplots(figsize=(10, 6))
    winner = summary.best_trial
    for trial in summary.trials:
        if trial.curve and trial is not winner:
            epochs, values = zip(*trial.curve, strict=True)
            axes.plot(epochs, values, marker="o", markersize=3, **OUTCOME_STYLES[trial.outcome])
    handles = [
        Line2D([], [], marker="o", markersize=3, label=f"{outcome} ({count})", **OUTCOME_STYLES[outcome])
        for outcome, count in outcome_counts(summary.trials).items()
        if count
    ]
    if winner is not None:
        epochs, values = zip(*winner.curve, strict=True)
        best_epoch, best_value = winner.best(summary.mode) or (0, math.nan)
        axes.plot(epochs, values, marker="o", markersize=4, zorder=5, **WINNER_STYLE)
        axes.plot([best_epoch], [best_value], marker="*", markersize=16, color=WINNER_STYLE["color"], zorder=6)
        handles.append(
            Line2D(
                [],
                [],
                marker="*",
                markersize=10,
                label=f"winner {winner.label}: {best_value:.4f} at epoch {best_epoch}",
                **WINNER_STYLE,
            )
        )
    for rung in summary.rungs:
        axes.axvline(rung, color="tab:purple", linestyle="-.", linewidth=1.0, alpha=0.7)
    if summary.rungs:
        handles.append(Line2D([], [], color="tab:purple", linestyle="-.", label="ASHA rung"))
    axes.axhline(summary.chance, color="black", linestyle=":", linewidth=1.2)
    handles.append(Line2D([], [], color="black", linestyle=":", label=f"chance ({summary.chance:.4f})"))
    axes.set_xlim(0.5, summary.max_t + 0.5)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("epoch")
    axes.set_ylabel(summary.metric)
    axes.set_title(f"{summary.name} ({summary.model}): {summary.metric} per epoch of every trial")
    axes.grid(alpha=0.3)
    axes.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return figure
