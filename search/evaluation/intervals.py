"""Bootstrap intervals of the test metrics: the final run's report and the comparison draw them the same way.

Every interval is a percentile interval of a bootstrap distribution, never a formula
that assumes normality: test metrics on a few hundred images are bounded and skewed.
The resamples are drawn once and shared by every model, so two models' intervals (and
their difference) come from the same images, resample by resample: the comparison is
paired, which is what makes small differences between models on one test split visible.

Pure (numpy, scipy, scikit-learn): testable without torch or MLflow.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from search.evaluation.calibration import expected_calibration_error, resampled_ece
from search.evaluation.predictions import Predictions
from search.evaluation.roc_auc import resampled_roc_auc, roc_auc

RESAMPLES = 2000
CONFIDENCE = 0.95
_TAILS = (100 * (1 - CONFIDENCE) / 2, 100 * (1 + CONFIDENCE) / 2)
_NAN = float("nan")
COMPARED_METRICS = {
    "test_acc": "accuracy",
    "test_balanced_acc": "balanced accuracy",
    "test_macro_f1": "macro F1",
    "test_roc_auc": "ROC-AUC",
    "test_ece": "ECE",
}
"""Test metrics given with a bootstrap interval, and how the report names them (ECE: lower is better)."""


@dataclass(frozen=True)
class Interval:
    """A point estimate with its 95 % bootstrap confidence interval."""

    value: float
    low: float
    high: float

    def contains(self, x: float) -> bool:
        return self.low <= x <= self.high


# --- resampling -----------------------------------------------------------------------------------------------


def stratified_resamples(labels: np.ndarray, resamples: int = RESAMPLES, seed: int = 0) -> np.ndarray:
    """(resamples, N) image indices, each row drawn with replacement within each class.

    Within each class, so every row keeps each class's count: no resample loses a rare
    class (ROC-AUC and balanced accuracy stay defined) and the class mix is the test
    split's. Drawn once and shared by every model, so that their intervals are paired.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    rows = np.empty((resamples, len(labels)), dtype=np.int64)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        rows[:, members] = members[rng.integers(0, len(members), size=(resamples, len(members)))]
    return rows


def check_resamples(resamples: np.ndarray, images: int) -> None:
    """A ValueError unless `resamples` index `images` test images: rows drawn for another split are refused."""
    if resamples.ndim != 2 or resamples.shape[1] != images:
        raise ValueError(
            f"resamples of shape {resamples.shape} do not index {images} test images: drawn for another split?"
        )


def percentile_interval(value: float, distribution: np.ndarray) -> Interval:
    """The value on all images, with the percentile interval of its bootstrap distribution (NaN if undefined)."""
    if np.isnan(value) or np.isnan(distribution).any():
        return Interval(float(value), _NAN, _NAN)
    low, high = np.percentile(distribution, _TAILS)
    return Interval(float(value), float(low), float(high))


def negated(interval: Interval) -> Interval:
    """b - a from a - b."""
    return Interval(-interval.value, -interval.high, -interval.low)


# --- metrics with intervals -----------------------------------------------------------------------------------


def metric_intervals(predictions: Predictions, resamples: np.ndarray) -> dict[str, Interval]:
    """Each of COMPARED_METRICS on all test images, with its bootstrap interval over `resamples`."""
    return score_intervals(predictions.labels, predictions.probabilities, resamples)


def score_intervals(labels: np.ndarray, probabilities: np.ndarray, resamples: np.ndarray) -> dict[str, Interval]:
    """metric_intervals from the arrays alone: what final.py reports with its test scores, before any file exists."""
    check_resamples(resamples, len(labels))
    classes = probabilities.shape[1]
    with_full = np.vstack([np.arange(len(labels))[None, :], resamples])
    counted = _counted_metrics(_confusions(labels, probabilities.argmax(axis=1), classes, with_full))
    intervals = {key: percentile_interval(values[0], values[1:]) for key, values in counted.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a class missing from the test split: ROC-AUC is NaN, said so by the interval
        auc = roc_auc(labels, probabilities, list(range(classes)))
    intervals["test_roc_auc"] = percentile_interval(auc, resampled_roc_auc(labels, probabilities, resamples))
    ece = resampled_ece(labels, probabilities, resamples)
    intervals["test_ece"] = percentile_interval(expected_calibration_error(labels, probabilities), ece)
    return {key: intervals[key] for key in COMPARED_METRICS}


def _confusions(labels: np.ndarray, predicted: np.ndarray, classes: int, rows: np.ndarray) -> np.ndarray:
    """(R, C, C) confusion counts, one matrix per row of `rows`, in one bincount.

    Each image's cell (true * C + predicted) is looked up once; a row's offset keeps
    the rows' counts apart in the single flat bincount.
    """
    cells = labels.astype(np.int64) * classes + predicted
    offsets = np.arange(len(rows), dtype=np.int64)[:, None] * classes * classes
    counts = np.bincount((cells[rows] + offsets).ravel(), minlength=len(rows) * classes * classes)
    return counts.reshape(len(rows), classes, classes)


def _counted_metrics(confusions: np.ndarray) -> dict[str, np.ndarray]:
    """Accuracy, balanced accuracy and macro F1 of each confusion matrix, as scikit-learn defines them.

    Balanced accuracy averages recall over the classes present (support > 0); macro F1
    averages over all classes, 0 for a class with no true and no predicted image
    (zero_division=0).
    """
    true_positives = np.diagonal(confusions, axis1=1, axis2=2).astype(np.float64)
    support = confusions.sum(axis=2)
    predicted = confusions.sum(axis=1)
    present = support > 0
    recall = np.divide(true_positives, support, out=np.zeros_like(true_positives), where=present)
    f1_denominator = support + predicted
    f1 = np.divide(2 * true_positives, f1_denominator, out=np.zeros_like(true_positives), where=f1_denominator > 0)
    return {
        "test_acc": true_positives.sum(axis=1) / support.sum(axis=1),
        "test_balanced_acc": recall.sum(axis=1) / present.sum(axis=1),
        "test_macro_f1": f1.mean(axis=1),
    }
