"""Test results per subgroup: accuracy, balanced accuracy, sensitivity and specificity for each value of each
subgroup column (a manifest's site, sex, ... declared with run.py --subgroups), with 95 % bootstrap intervals.

The intervals are drawn as search.evaluation.intervals draws the test's: percentile intervals of
RESAMPLES resamples, each drawn with replacement within each class, here within the subgroup's
own images, seeded. A subgroup whose interval of a metric lies wholly below that metric on the
whole test split is marked (`below_overall`): the model does worse there, beyond what chance
explains. A subgroup of fewer than MIN_IMAGES images, or without an image of some class, gets
its values but no interval, and a note that says why: an interval from a handful of images, or
a sensitivity with no positive image, would mislead.

Sensitivity and specificity are of the positive class (`positive`: final.py --positive); without
one, of the second class when there are two, and the macro mean over the classes, each against
the rest, when there are more (`positive_class`).

Pure (numpy): testable without torch or MLflow.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from search.evaluation.formatting import span
from search.evaluation.intervals import CONFIDENCE, RESAMPLES, Interval, percentile_interval, stratified_resamples

METRICS = {
    "acc": "accuracy",
    "balanced_acc": "balanced accuracy",
    "sensitivity": "sensitivity",
    "specificity": "specificity",
}
"""Each subgroup's metrics, in report order, and how people call them."""
SHORT = {"acc": "acc", "balanced_acc": "bal.acc", "sensitivity": "sens", "specificity": "spec"}
"""The metrics' names in the closing report's narrow lines."""
MIN_IMAGES = 10
"""Fewer images than this in a subgroup: its values, no interval."""
LOGGED_VALUES = 20
"""A column with more values than this gets no MLflow metrics per value (they would crowd the run's charts); its
whole table is in the run's SUBGROUP_TABLE and metrics.json all the same."""
SUBGROUP_TABLE = "subgroup_metrics.json"
"""The final run's table artifact of every subgroup (MLflow's log_table)."""
MLFLOW_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")
"""What an MLflow metric name may not hold (it allows letters, digits, '_', '-', '.', ' ' and '/'; the last two
are replaced too, so that a name stays one word in the UI's charts)."""


# ---------------------------------------------------------------- the results


@dataclass(frozen=True)
class Subgroup:
    """One value of one subgroup column, on the test split."""

    images: int
    metrics: dict[str, Interval]
    """METRICS -> the value with its interval; NaN bounds where no interval is given (see `note`), a NaN value
    where the metric is undefined (a sensitivity without positive images)."""
    below_overall: tuple[str, ...]
    """The metrics whose interval lies wholly below the whole test split's value."""
    note: str | None = None
    """Why there is no interval (too few images, a class absent); None where there are intervals."""


@dataclass(frozen=True)
class SubgroupTable:
    """Every subgroup of every declared column, with the whole test split's values they are compared with."""

    positive: str | None
    """The class whose sensitivity and specificity these are; None: the macro mean over the classes."""
    overall: dict[str, float]
    """METRICS on the whole test split."""
    columns: dict[str, dict[str, Subgroup]]
    """column -> value -> its results, values in sorted order."""
    seed: int

    def marked(self) -> list[tuple[str, str, Subgroup]]:
        """(column, value, results) of each subgroup below the overall value in some metric."""
        return [
            (column, value, group)
            for column, values in self.columns.items()
            for value, group in values.items()
            if group.below_overall
        ]

    def to_dict(self) -> dict:
        """metrics.json's `subgroups`: JSON types, an undefined value or bound as null."""
        return {
            "positive": self.positive,
            "overall": {key: json_number(value) for key, value in self.overall.items()},
            "confidence": CONFIDENCE,
            "resamples": RESAMPLES,
            "seed": self.seed,
            "columns": {
                column: {value: subgroup_record(group) for value, group in values.items()}
                for column, values in self.columns.items()
            },
        }


def subgroup_record(group: Subgroup) -> dict:
    record: dict = {
        "images": group.images,
        "metrics": {
            key: {"value": json_number(i.value), "low": json_number(i.low), "high": json_number(i.high)}
            for key, i in group.metrics.items()
        },
        "below_overall": list(group.below_overall),
    }
    if group.note:
        record["note"] = group.note
    return record


def json_number(value: float) -> float | None:
    """A float as JSON holds it: NaN (undefined) as null, which json.dumps would write as the invalid NaN."""
    return None if math.isnan(value) else float(value)


# ---------------------------------------------------------------- computing them


def positive_class(positive: int | None, classes: Sequence[str]) -> int | None:
    """The class sensitivity and specificity are of: the one named (--positive), else with two classes the second,
    else None (the macro mean of each class against the rest)."""
    if positive is not None:
        return positive
    return 1 if len(classes) == 2 else None


def subgroup_table(
    labels: np.ndarray,
    predictions: np.ndarray,
    classes: Sequence[str],
    values: Mapping[str, Sequence[str]],
    positive: int | None = None,
    *,
    seed: int = 0,
    resamples: int = RESAMPLES,
) -> SubgroupTable:
    """The results per subgroup. `labels` and `predictions` are the test images' true and predicted classes,
    `values` each column's value per image (in the same order), `positive` the --positive class's index (None: see
    positive_class)."""
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    chosen = positive_class(positive, classes)
    everyone = np.arange(len(labels))[None, :]
    overall = {
        key: float(rates[0]) for key, rates in scores(labels, predictions, len(classes), everyone, chosen).items()
    }
    columns = {}
    for column, given in values.items():
        per_image = np.asarray(given, dtype=object)
        if len(per_image) != len(labels):
            raise ValueError(f"subgroup column {column!r} has {len(per_image)} values for {len(labels)} test images")
        columns[column] = {
            value: subgroup(
                labels, predictions, classes, np.flatnonzero(per_image == value), chosen, overall, seed, resamples
            )
            for value in sorted(set(per_image))
        }
    return SubgroupTable(None if chosen is None else classes[chosen], overall, columns, seed)


def subgroup(
    labels: np.ndarray,
    predictions: np.ndarray,
    classes: Sequence[str],
    members: np.ndarray,
    positive: int | None,
    overall: dict[str, float],
    seed: int,
    resamples: int,
) -> Subgroup:
    """One subgroup's values, its intervals (resampled within the subgroup, within each class) unless it is too
    small, and the metrics in which it falls below the overall value."""
    own_labels, own_predictions = labels[members], predictions[members]
    absent = [name for label, name in enumerate(classes) if not (own_labels == label).any()]
    note = None
    if len(members) < MIN_IMAGES:
        note = f"{len(members)} image(s), fewer than {MIN_IMAGES}: no interval"
    elif absent:
        note = f"no image of class(es) {', '.join(absent[:5])}{', ...' if len(absent) > 5 else ''}: no interval"
    rows = np.arange(len(members))[None, :]
    if note is None:
        rows = np.vstack([rows, stratified_resamples(own_labels, resamples, seed)])
    counted = scores(own_labels, own_predictions, len(classes), rows, positive)
    intervals = {
        key: percentile_interval(values[0], values[1:])
        if note is None
        else Interval(float(values[0]), math.nan, math.nan)
        for key, values in counted.items()
    }
    below = tuple(key for key, interval in intervals.items() if interval.high < overall[key])  # NaN: never below
    return Subgroup(len(members), intervals, below, note)


def scores(
    labels: np.ndarray, predictions: np.ndarray, classes: int, rows: np.ndarray, positive: int | None
) -> dict[str, np.ndarray]:
    """METRICS for each row of `rows` (image indices: the images themselves, then resamples of them), as
    scikit-learn defines them: balanced accuracy averages recall over the classes present. NaN where undefined."""
    confusions = confusion_counts(labels, predictions, classes, rows).astype(np.float64)
    hits = np.diagonal(confusions, axis1=1, axis2=2)
    support = confusions.sum(axis=2)  # true images per class
    called = confusions.sum(axis=1)  # images predicted as each class
    total = support.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = hits / support  # NaN for a class without images
        negatives = total - support
        specificity = (negatives - (called - hits)) / negatives  # TN / (TN + FP), one class against the rest
    balanced = mean_of_defined(recall)  # over the classes present, as scikit-learn's balanced_accuracy_score
    if positive is None:
        sensitivity, specific = balanced, mean_of_defined(specificity)
    else:
        sensitivity, specific = recall[:, positive], specificity[:, positive]
    return {
        "acc": hits.sum(axis=1) / total[:, 0],
        "balanced_acc": balanced,
        "sensitivity": sensitivity,
        "specificity": specific,
    }


def mean_of_defined(rates: np.ndarray) -> np.ndarray:
    """The mean of each row over its defined (not NaN) entries; NaN for a row with none."""
    defined = ~np.isnan(rates)
    counts = defined.sum(axis=1)
    sums = np.where(defined, rates, 0.0).sum(axis=1)
    return np.divide(sums, counts, out=np.full(len(rates), np.nan), where=counts > 0)


def confusion_counts(labels: np.ndarray, predictions: np.ndarray, classes: int, rows: np.ndarray) -> np.ndarray:
    """(R, C, C) confusion counts (true, predicted), one matrix per row of `rows`, in one bincount: a row's offset
    keeps its counts apart from the others'."""
    cells = labels.astype(np.int64) * classes + predictions.astype(np.int64)
    offsets = np.arange(len(rows), dtype=np.int64)[:, None] * classes * classes
    counts = np.bincount((cells[rows] + offsets).ravel(), minlength=len(rows) * classes * classes)
    return counts.reshape(len(rows), classes, classes)


# ---------------------------------------------------------------- for people and the run


def metric_name(column: str, value: str, metric: str) -> str:
    """The MLflow metric of one subgroup: subgroup_<column>_<value>_<metric>, anything MLflow might refuse (or
    split a chart's name at) replaced by '_'."""
    return MLFLOW_UNSAFE.sub("_", f"subgroup_{column}_{value}_{metric}")


def logged_metrics(table: SubgroupTable) -> dict[str, float]:
    """The value of each metric of each subgroup (not its bounds: those are in the table), for columns of at most
    LOGGED_VALUES values; undefined values left out."""
    return {
        metric_name(column, value, key): interval.value
        for column, values in table.columns.items()
        if len(values) <= LOGGED_VALUES
        for value, group in values.items()
        for key, interval in group.metrics.items()
        if not math.isnan(interval.value)
    }


def table_columns(table: SubgroupTable) -> dict[str, list]:
    """One row per subgroup (MLflow's log_table): column, value, images, each metric with its bounds, the metrics
    below overall, the note."""
    rows = [(column, value, group) for column, values in table.columns.items() for value, group in values.items()]
    columns: dict[str, list] = {
        "column": [column for column, _, _ in rows],
        "value": [value for _, value, _ in rows],
        "images": [group.images for _, _, group in rows],
    }
    for key in METRICS:
        for part in ("value", "low", "high"):
            name = key if part == "value" else f"{key}_{part}"
            columns[name] = [json_number(getattr(group.metrics[key], part)) for _, _, group in rows]
    columns["below_overall"] = [",".join(group.below_overall) for _, _, group in rows]
    columns["note"] = [group.note or "" for _, _, group in rows]
    return columns


def interval_text(interval: Interval) -> str:
    """'0.8123 (0.7500–0.8700)', the value alone where there is no interval, 'n/a' for an undefined value."""
    if math.isnan(interval.value):
        return "n/a"
    if math.isnan(interval.low) or math.isnan(interval.high):
        return f"{interval.value:.4f}"
    return f"{interval.value:.4f} ({span(interval.low, interval.high)})"


def summary_lines(table: SubgroupTable, shown: int = 12) -> list[str]:
    """The closing report's lines: the subgroups below overall first, then up to `shown` subgroups."""
    about = f"positive class {table.positive}" if table.positive else "sensitivity, specificity: macro over classes"
    lines = [f"Subgroups ({about}; {round(100 * CONFIDENCE)} % CI within each subgroup):"]
    for column, value, group in table.marked():
        below = ", ".join(
            f"{METRICS[key]} {interval_text(group.metrics[key])} < {table.overall[key]:.4f}"
            for key in group.below_overall
        )
        lines.append(f"  below overall: {column}={value} ({group.images} images): {below}")
    rows = [(column, value, group) for column, values in table.columns.items() for value, group in values.items()]
    for column, value, group in rows[:shown]:
        scores_text = "  ".join(f"{SHORT[key]} {interval_text(group.metrics[key])}" for key in METRICS)
        lines.append(
            f"  {column}={value}  {group.images} images  {scores_text}{f'  ({group.note})' if group.note else ''}"
        )
    if len(rows) > shown:
        lines.append(f"  ... {len(rows) - shown} more subgroup(s) in metrics.json and {SUBGROUP_TABLE}")
    return lines
