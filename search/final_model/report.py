"""The one held-out test: metrics from scikit-learn, a confusion-matrix plot, a short report.

Everything here works on plain arrays (labels, logits), so it can be checked
without a model.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.metrics import (
    ConfusionMatrixDisplay,
    accuracy_score,
    balanced_accuracy_score,
    classification_report,
    confusion_matrix,
    f1_score,
    log_loss,
    precision_recall_fscore_support,
    roc_auc_score,
)

from trainables.config import METRIC_MODES

ECE_BINS = 15
OVERFIT_GAP = 0.05
"""A test score this far below the search's best validation score earns a warning."""


@dataclass(frozen=True)
class HeldOutResult:
    metrics: dict[str, float]
    """test_loss, test_acc, test_balanced_acc, test_macro_f1, test_roc_auc, test_ece."""
    per_class: dict[str, dict[str, float]]
    """class name -> precision, recall, f1, support."""
    confusion: np.ndarray
    """(C, C) counts: rows are true classes, columns predictions."""
    report: str
    """scikit-learn's classification report (text)."""
    predictions: np.ndarray
    labels: np.ndarray
    probabilities: np.ndarray
    """(N, C) softmax of the logits."""


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def expected_calibration_error(labels: np.ndarray, probabilities: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE with equal-width confidence bins (Guo et al., 2017); scikit-learn has no multiclass ECE.

    Each prediction is binned by its confidence (top-class probability). The ECE is
    the average, weighted by bin size, of |accuracy - mean confidence| over the bins:
    0 for a perfectly calibrated model.
    """
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    # Bin b holds confidences in (b/bins, (b+1)/bins]; a confidence of exactly 0 joins bin 0.
    which = np.digitize(confidence, np.linspace(0, 1, bins + 1)[1:-1], right=True)
    ece = 0.0
    for b in np.unique(which):
        members = which == b
        ece += members.mean() * abs(correct[members].mean() - confidence[members].mean())
    return float(ece)


def evaluate_test(logits: np.ndarray, labels: np.ndarray, classes: list[str]) -> HeldOutResult:
    """Every test metric of the final run, from the logits of the test split."""
    everyone = list(range(len(classes)))
    probabilities = softmax(logits)
    predictions = probabilities.argmax(axis=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a class that is never predicted has no precision: reported as 0
        metrics = {
            "test_loss": float(log_loss(labels, probabilities, labels=everyone)),
            "test_acc": float(accuracy_score(labels, predictions)),
            "test_balanced_acc": float(balanced_accuracy_score(labels, predictions)),
            "test_macro_f1": float(f1_score(labels, predictions, labels=everyone, average="macro", zero_division=0)),
            "test_roc_auc": roc_auc(labels, probabilities, everyone),
            "test_ece": expected_calibration_error(labels, probabilities),
        }
        precision, recall, f1, support = precision_recall_fscore_support(
            labels, predictions, labels=everyone, zero_division=0
        )
        report = classification_report(
            labels, predictions, labels=everyone, target_names=classes, digits=4, zero_division=0
        )
    per_class = {
        name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
        for name, p, r, f, s in zip(classes, precision, recall, f1, support, strict=True)
    }
    confusion = confusion_matrix(labels, predictions, labels=everyone)
    return HeldOutResult(metrics, per_class, confusion, report, predictions, labels, probabilities)


def roc_auc(labels: np.ndarray, probabilities: np.ndarray, everyone: list[int]) -> float:
    """One-vs-rest macro ROC-AUC; NaN when a class is missing from the test split (undefined)."""
    try:
        if len(everyone) == 2:
            return float(roc_auc_score(labels, probabilities[:, 1]))
        return float(roc_auc_score(labels, probabilities, multi_class="ovr", average="macro", labels=everyone))
    except ValueError:
        return float("nan")


PER_CLASS_TABLE = "per_class_metrics.json"
"""The final run's per-class scores: one table artifact, not three metrics per class crowding the charts."""
PER_CLASS_COLUMNS = ("precision", "recall", "f1", "support")


def per_class_table(result: HeldOutResult) -> dict[str, list]:
    """Columns class, precision, recall, f1 and support, one row per class (MLflow's log_table)."""
    rows = result.per_class.values()
    return {"class": list(result.per_class), **{key: [row[key] for row in rows] for key in PER_CLASS_COLUMNS}}


def plot_confusion(result: HeldOutResult, classes: list[str], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window: chosen before pyplot loads, so pyplot loads here
    import matplotlib.pyplot as plt

    side = min(4 + 0.55 * len(classes), 24)
    figure, axes = plt.subplots(figsize=(side, side * 0.9))
    ConfusionMatrixDisplay(result.confusion, display_labels=classes).plot(
        ax=axes, cmap="Blues", colorbar=False, xticks_rotation="vertical", values_format="d"
    )
    axes.set_title(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def summary_lines(result: HeldOutResult, metric: str, best_value: float | None, test_images: int) -> list[str]:
    """The short report: test scores, and the search's best validation score beside its test twin."""
    rows = [
        ("accuracy", "test_acc"),
        ("balanced accuracy", "test_balanced_acc"),
        ("macro F1", "test_macro_f1"),
        ("ROC-AUC (OvR macro)", "test_roc_auc"),
        (f"ECE ({ECE_BINS} bins)", "test_ece"),
        ("loss", "test_loss"),
    ]
    lines = [f"Test split: {test_images} images the search never saw"]
    lines += [f"  {label:<20}{result.metrics[key]:.4f}" for label, key in rows]
    worst = min(result.per_class.items(), key=lambda item: item[1]["recall"])
    lines.append(
        f"  {'lowest recall':<20}{worst[1]['recall']:.4f} ({worst[0]}; all classes in classification_report.txt)"
    )
    if best_value is not None:
        lines += comparison_lines(result, metric, best_value)
    return lines


def comparison_lines(result: HeldOutResult, metric: str, best_value: float) -> list[str]:
    twin = "test_" + metric.removeprefix("val_")
    test_value = result.metrics[twin]
    lines = [f"Search's best {metric} {best_value:.4f}  vs  {twin} {test_value:.4f}"]
    if METRIC_MODES.get(metric) == "max" and best_value - test_value > OVERFIT_GAP:
        lines.append(
            f"warning: the test score is {best_value - test_value:.3f} below the search's best validation score: "
            f"the search may have overfit its validation split (small, or reused by many trials); trust the test score"
        )
    return lines
