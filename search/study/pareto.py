"""A multi-objective study's Pareto front: its trials' metric against their cost, and the trials no other one beats.

The caller gathers the points (search.study.run_report: the values the Optuna study was told, the labels
and run ids of the trials' MLflow runs) and logs what these functions write; nothing here talks to Ray or
MLflow, so the front can be checked on points made up in a test.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna

from trainables.config import Cost

FRONT_PLOT, FRONT_TABLE = "pareto_front.png", "pareto_front.csv"
"""The front's files on the study's run."""
DPI = 120


@dataclass(frozen=True)
class Point:
    """One completed trial, as the multi-objective search saw it."""

    label: str
    """Its short name in MLflow, t07."""
    score: float
    """The study's metric at the trial's best epoch."""
    cost: float
    """What the model costs, in the Cost's unit."""
    run_id: str = ""
    """The trial's MLflow run: what `final.py --run-id` retrains."""
    params: dict[str, Any] = field(default_factory=dict)
    """The sampled hyperparameters."""


@dataclass(frozen=True)
class Tradeoff:
    """A multi-objective study's every completed trial, and what its objectives are."""

    metric: str
    mode: str
    """'max' or 'min': which way the metric improves (the cost is always minimised)."""
    cost: Cost
    points: tuple[Point, ...]

    @property
    def front(self) -> list[Point]:
        return pareto_front(self.points, self.mode)


def dominates(a: Point, b: Point, mode: str) -> bool:
    """Whether `a` is at least as good as `b` on both objectives and better on one."""
    sign = 1.0 if mode == "max" else -1.0
    no_worse = sign * a.score >= sign * b.score and a.cost <= b.cost
    return no_worse and (sign * a.score > sign * b.score or a.cost < b.cost)


def pareto_front(points: Sequence[Point], mode: str) -> list[Point]:
    """The points no other one dominates, cheapest first (two equal points are both on it, as in Optuna's
    best_trials)."""
    front = [point for point in points if not any(dominates(other, point, mode) for other in points)]
    return sorted(front, key=lambda point: (point.cost, point.label))


def metric_only(study: optuna.Study) -> optuna.Study:
    """A multi-objective study as a single-objective one of its first objective, the study's metric (in memory):
    Optuna's plots and importances take one value per trial. A single-objective study is returned as it is."""
    if len(study.directions) == 1:
        return study
    single = optuna.create_study(direction=study.directions[0], study_name=study.study_name)
    single.add_trials(
        [
            optuna.trial.create_trial(
                state=trial.state,
                values=trial.values[:1] if trial.values else None,
                params=trial.params,
                distributions=trial.distributions,
                user_attrs=trial.user_attrs,
            )
            for trial in study.get_trials(deepcopy=False)
            if trial.state.is_finished()
        ]
    )
    return single


# ---------------------------------------------------------------- what a person reads


def shown_cost(value: float, cost: Cost) -> str:
    """'3.12 ms', '5.52 M', '812 MB'."""
    return f"{value:,.0f} {cost.unit}" if value >= 100 else f"{value:.3g} {cost.unit}"


def retrain_command(study: str, point: Point) -> str:
    return f"python search/final.py --study {study} --trial {point.label}"


def front_lines(tradeoff: Tradeoff, study: str) -> list[str]:
    """The front as the study's closing lines print it, cheapest first."""
    front = tradeoff.front
    lines = [
        f"Pareto front: {tradeoff.metric} against {tradeoff.cost.meaning}, {len(front)} of "
        f"{len(tradeoff.points)} completed trials (cheapest first):"
    ]
    lines += [f"  {p.label}  {tradeoff.metric} {p.score:.4f}  {shown_cost(p.cost, tradeoff.cost)}" for p in front]
    if front:
        lines.append(f"Retrain a point: {retrain_command(study, front[0])}   (or --run-id of its run)")
    return lines


def front_markdown(tradeoff: Tradeoff, study: str) -> list[str]:
    """The front as a Markdown section of the study's note."""
    metric, cost = tradeoff.metric, tradeoff.cost
    lines = [
        "## Pareto front",
        "",
        f"{metric} against {cost.meaning}: the trials no other one beats on both "
        f"(plot: `{FRONT_PLOT}`, table: `{FRONT_TABLE}`). Retrain one with its command.",
        "",
        f"| trial | {metric} | {cost.metric} | retrain |",
        "| --- | --- | --- | --- |",
    ]
    lines += [
        f"| {p.label} | {p.score:.4f} | {shown_cost(p.cost, cost)} | `{retrain_command(study, p)}` |"
        for p in tradeoff.front
    ]
    return lines


def write_front_table(tradeoff: Tradeoff, study: str, path: Path) -> Path:
    """pareto_front.csv: one row per point of the front, cheapest first, with its hyperparameters and the
    command that retrains it."""
    front = tradeoff.front
    knobs = list(dict.fromkeys(name for point in front for name in point.params))
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["trial", tradeoff.metric, tradeoff.cost.metric, "run_id", *knobs, "retrain"])
    for point in front:
        writer.writerow(
            [
                point.label,
                f"{point.score:.6g}",
                f"{point.cost:.6g}",
                point.run_id,
                *(point.params.get(name, "") for name in knobs),
                f"python search/final.py --run-id {point.run_id}" if point.run_id else retrain_command(study, point),
            ]
        )
    path.write_text(buffer.getvalue())
    return path


def write_front_plot(tradeoff: Tradeoff, title: str, path: Path) -> Path:
    """pareto_front.png: every completed trial's cost against its metric, the front highlighted and joined."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    front = tradeoff.front
    on_front = {point.label for point in front}
    others = [point for point in tradeoff.points if point.label not in on_front]
    figure, axes = plt.subplots(figsize=(8, 5.5))
    if others:
        axes.scatter([p.cost for p in others], [p.score for p in others], color="grey", alpha=0.6, label="other trials")
    # The front as a staircase: between two points, the cheaper one's score is what that cost buys.
    axes.step(
        [p.cost for p in front],
        [p.score for p in front],
        where="post",
        color="tab:red",
        linewidth=1.5,
        marker="o",
        markersize=7,
        label=f"Pareto front ({len(front)})",
    )
    for point in tradeoff.points:
        axes.annotate(point.label, (point.cost, point.score), textcoords="offset points", xytext=(5, 4), fontsize=8)
    axes.set_xlabel(f"{tradeoff.cost.metric} ({tradeoff.cost.unit}, lower is better)")
    axes.set_ylabel(f"{tradeoff.metric} ({'higher' if tradeoff.mode == 'max' else 'lower'} is better)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(loc="best")
    figure.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(figure)
    return path
