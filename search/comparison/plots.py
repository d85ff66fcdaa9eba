"""The comparison's three PNG plots: accuracy with intervals, accuracy against latency, confusion matrices.

Drawn from a computed `Comparison`, in the tables' order and words (report.py). matplotlib is
imported inside `write_plots` only, with the Agg backend: files, never a window.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from search.comparison.report import (
    MAX_LABELLED_CLASSES,
    PLOT_FILES,
    display_name,
    latency_accuracy,
    ordered,
    pareto_front,
)
from search.comparison.results import Comparison, ModelResult
from search.evaluation.formatting import NA, finite, percent
from search.evaluation.intervals import Interval

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

LOG_SPREAD = 10.0
"""Latencies further apart than this factor get a log axis: a 2 ms and a 40 ms model on one linear axis squash."""
MAX_ANNOTATED_CLASSES = 10
"""Up to this many classes each confusion cell prints its share; above it the cells are too small."""
DPI = 120
REFERENCE_COLOR = "tab:orange"
MODEL_COLOR = "tab:blue"
OFF_FRONT_COLOR = "0.6"


def row_normalised(confusion: np.ndarray) -> np.ndarray:
    """Each true class's row as shares of its images (recall on the diagonal); a class with no image stays 0."""
    counts = np.asarray(confusion, dtype=np.float64)
    totals = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)


def percent_bars(intervals: Sequence[Interval | None]) -> tuple[np.ndarray, np.ndarray]:
    """Values in percent and (2, N) error-bar lengths; a missing bound draws no bar rather than failing."""
    values = np.array([100 * i.value if i is not None else math.nan for i in intervals], dtype=np.float64)
    lows = np.array([100 * i.low if i is not None else math.nan for i in intervals], dtype=np.float64)
    highs = np.array([100 * i.high if i is not None else math.nan for i in intervals], dtype=np.float64)
    below = np.nan_to_num(values - lows, nan=0.0).clip(min=0.0)
    above = np.nan_to_num(highs - values, nan=0.0).clip(min=0.0)
    return values, np.vstack([below, above])


def saved(figure: Figure, path: Path, plt: Any) -> Path:
    figure.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(figure)
    return path


def write_plots(comparison: Comparison, folder: Path) -> list[Path]:
    """PLOT_FILES drawn into `folder` (created if needed), in that order; the paths written."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window: chosen before pyplot loads, so pyplot loads here
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    draw = (accuracy_figure, accuracy_latency_figure, confusion_figure)
    return [saved(figure(comparison, plt), folder / name, plt) for figure, name in zip(draw, PLOT_FILES, strict=True)]


def accuracy_figure(comparison: Comparison, plt: Any) -> Figure:
    """Test accuracy per model with its interval, one row each (top to bottom as in the tables), chance dashed."""
    models = ordered(comparison)
    figure, axes = plt.subplots(figsize=(8, 1.2 + 0.6 * len(models)))
    values, bars = percent_bars([model.metrics.get("test_acc") for model in models])
    for row, model in enumerate(models):
        axes.errorbar(
            values[row],
            row,
            xerr=bars[:, row : row + 1],
            fmt="D" if model.reference else "o",
            color=REFERENCE_COLOR if model.reference else MODEL_COLOR,
            markersize=8,
            capsize=5,
            linewidth=2,
        )
        if finite(values[row]):
            axes.annotate(
                f"{values[row]:.1f} %", (values[row], row), xytext=(0, 8), textcoords="offset points", ha="center"
            )
    chance = 100 / len(comparison.classes) if comparison.classes else math.nan
    if finite(chance):
        axes.axvline(chance, color="black", linestyle="--", linewidth=1.2, label=f"chance ({chance:.1f} %)")
        axes.legend(loc="best", frameon=False)
    axes.set_yticks(range(len(models)), [display_name(model) for model in models])
    axes.set_ylim(len(models) - 0.5, -0.5)  # the first model on top
    axes.set_xlabel("test accuracy (%)")
    axes.set_title(f"{comparison.name}: test accuracy, 95 % bootstrap intervals ({comparison.test_images} images)")
    axes.grid(axis="x", alpha=0.3)
    return figure


def accuracy_latency_figure(comparison: Comparison, plt: Any) -> Figure:
    """Accuracy against batch-1 latency, each model named; the Pareto front joined, the models off it grey."""
    models = [model for model in ordered(comparison) if all(finite(x) for x in latency_accuracy(model))]
    unmeasured = [model.name for model in ordered(comparison) if all(model is not drawn for drawn in models)]
    figure, axes = plt.subplots(figsize=(8, 5.5))
    if not models:
        axes.text(0.5, 0.5, "no model has both a latency and an accuracy", ha="center", va="center")
        axes.set_axis_off()
        return figure
    points = [latency_accuracy(model) for model in models]
    front = pareto_front(points)
    latencies = np.array([latency for latency, _ in points])
    values, bars = percent_bars([model.metrics.get("test_acc") for model in models])
    for i, model in enumerate(models):
        on_front = i in front
        color = (REFERENCE_COLOR if model.reference else MODEL_COLOR) if on_front else OFF_FRONT_COLOR
        axes.errorbar(
            latencies[i],
            values[i],
            yerr=bars[:, i : i + 1],
            fmt="D" if model.reference else "o",
            color=color,
            markersize=9 if on_front else 7,
            capsize=4,
            zorder=3,
        )
        axes.annotate(
            display_name(model),
            (latencies[i], values[i]),
            xytext=(7, 7),
            textcoords="offset points",
            color=color,
            bbox={"boxstyle": "round,pad=0.15", "facecolor": "white", "edgecolor": "none", "alpha": 0.8},
            zorder=4,
        )
    by_latency = sorted(front, key=lambda i: (latencies[i], -values[i]))
    axes.plot(
        latencies[by_latency],
        values[by_latency],
        color="tab:green",
        linestyle="-",
        linewidth=1.5,
        marker="o",
        markersize=14,
        markerfacecolor="none",
        zorder=2,
        label="Pareto front (none both faster and more accurate)",
    )
    if latencies.min() > 0 and latencies.max() / latencies.min() > LOG_SPREAD:
        log_axis(axes)
    devices = sorted({model.costs.device for model in models})
    axes.set_xlabel(f"inference latency at batch 1 (ms, median, on {'/'.join(devices)})")
    axes.set_ylabel("test accuracy (%)")
    missing = f"\n(not shown, no latency or accuracy: {', '.join(unmeasured)})" if unmeasured else ""
    axes.set_title(f"{comparison.name}: accuracy against latency{missing}")
    axes.grid(alpha=0.3)
    axes.legend(loc="best", frameon=False)
    axes.margins(x=0.15, y=0.1)  # room for the names beside the points
    return figure


def log_axis(axes: Axes) -> None:
    """A log x axis labelled 1, 2, 5, 10, 20, 50 ms rather than matplotlib's 2×10⁰, 3×10⁰, which collide."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axes.set_xscale("log")
    axes.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axes.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
    axes.xaxis.set_minor_formatter(NullFormatter())


def confusion_title(model: ModelResult) -> str:
    """'cnn (acc 91.2 %)'; a reference's long timm name gets its marks on a second line, to fit its panel."""
    accuracy = model.metrics.get("test_acc")
    accuracy_text = f"acc {percent(accuracy.value)}" if accuracy is not None else f"acc {NA}"
    if model.reference:
        return f"{model.name}\n(reference, {accuracy_text})"
    return f"{model.name} ({accuracy_text})"


def confusion_figure(comparison: Comparison, plt: Any) -> Figure:
    """One confusion matrix per model, side by side, each row as shares of its class, on one colour scale."""
    models = ordered(comparison)
    classes = comparison.classes
    count = len(classes)
    labelled = count <= MAX_LABELLED_CLASSES
    side = 3.2 + 0.28 * count if labelled else 6.0
    figure, panels = plt.subplots(
        1, len(models), figsize=(side * len(models) + 1.5, side + 1.0), squeeze=False, layout="constrained"
    )
    image = None
    for column, (axes, model) in enumerate(zip(panels[0], models, strict=True)):
        shares = 100 * row_normalised(model.confusion)
        image = axes.imshow(shares, cmap="Blues", vmin=0.0, vmax=100.0)
        axes.set_title(confusion_title(model), fontsize=10)
        names = classes if labelled and shares.shape[0] == count else None
        label_axes(axes, names, shares.shape[0], first=column == 0)
        if shares.shape[0] <= MAX_ANNOTATED_CLASSES:
            annotate_cells(axes, shares)
    if image is not None:
        figure.colorbar(image, ax=panels[0].tolist(), shrink=0.8, label="% of the true class's images")
    return figure


def label_axes(axes: Axes, classes: Sequence[str] | None, size: int, first: bool) -> None:
    """Class names when there are few enough (else matplotlib's indices); the true classes only on the
    first panel, as the panels share them and the names would run into the panel on the left."""
    axes.set_xlabel("predicted")
    if first:
        axes.set_ylabel("true")
    if classes is not None:
        axes.set_xticks(range(size), list(classes), rotation=90)
        axes.set_yticks(range(size), list(classes) if first else [])
    elif not first:
        axes.set_yticklabels([])


def annotate_cells(axes: Axes, shares: np.ndarray) -> None:
    """Each cell's percent, white on the dark cells so it stays legible."""
    for (row, column), share in np.ndenumerate(shares):
        axes.text(
            column,
            row,
            f"{share:.0f}",
            ha="center",
            va="center",
            fontsize=8,
            color="white" if share > 50 else "black",
        )
