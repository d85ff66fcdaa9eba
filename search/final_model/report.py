"""The one held-out test: calibrated metrics with bootstrap intervals, plots, a short report.

Everything here works on plain arrays (labels, logits), so it can be checked
without a model. The probabilities are the calibrated ones (search.evaluation.calibration:
a temperature fitted on the val split, when the model did not train on it); the
intervals come from the bootstrap compare.py uses too (search.evaluation.intervals), the
very resamples compare.py would draw for this split with the same seed.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from sklearn.metrics import (
    ConfusionMatrixDisplay,
    accuracy_score,
    balanced_accuracy_score,
    classification_report,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
)

from search.evaluation.calibration import ECE_BINS, Calibration, LabelledLogits, calibrate, softmax
from search.evaluation.formatting import fixed, score_ci
from search.evaluation.intervals import CONFIDENCE, RESAMPLES, Interval, score_intervals, stratified_resamples
from search.evaluation.roc_auc import roc_auc
from search.evaluation.subgroups import SubgroupTable, subgroup_table
from search.evaluation.subgroups import logged_metrics as subgroup_metrics
from search.evaluation.subgroups import summary_lines as subgroup_lines
from trainables.config import METRIC_MODES

OVERFIT_GAP = 0.05
"""A test score this far below the search's best validation score earns a warning."""
INTERVAL_SEED = 0
"""Seeds the bootstrap resamples, so that the same predictions always get the same intervals."""
INTERVAL_METHOD = "percentile bootstrap, resampled within each class"


@dataclass(frozen=True, kw_only=True)
class HeldOutResult:
    metrics: dict[str, float]
    """test_loss (NLL), test_acc, test_balanced_acc, test_macro_f1, test_roc_auc, test_ece: of the calibrated
    probabilities (the accuracies and F1 are those of the uncalibrated ones too: a temperature keeps the argmax)."""
    intervals: dict[str, Interval]
    """test_acc, test_balanced_acc, test_macro_f1, test_roc_auc, test_ece (COMPARED_METRICS) -> the value with its
    CONFIDENCE (95 %) interval: INTERVAL_METHOD, RESAMPLES resamples, seed INTERVAL_SEED. NaN bounds: undefined."""
    calibration: Calibration
    """The temperature, the split it was fitted on (None: not calibrated), the test ECE and NLL before and after."""
    per_class: dict[str, dict[str, float]]
    """class name -> precision, recall, f1, support, sensitivity, specificity. One-vs-rest: sensitivity is the
    recall, TP / (TP + FN), under its clinical name; specificity is TN / (TN + FP)."""
    confusion: np.ndarray
    """(C, C) counts: rows are true classes, columns predictions."""
    report: str
    """scikit-learn's classification report, then the one-vs-rest sensitivity and specificity (text)."""
    predictions: np.ndarray
    labels: np.ndarray
    probabilities: np.ndarray
    """(N, C) calibrated class probabilities: softmax(logits / temperature)."""
    subgroups: SubgroupTable | None = None
    """The scores per value of each subgroup column the study declared (with_subgroups); None: none declared."""


def with_subgroups(
    result: HeldOutResult, values: Mapping[str, Sequence[str]], positive: int | None, classes: Sequence[str]
) -> HeldOutResult:
    """The result with its scores per subgroup (`values`: each declared column's value per test image, in the
    result's order; `positive`: the --positive class's index, or None), resampled with INTERVAL_SEED; the result
    as it is where no column is declared."""
    if not values:
        return result
    table = subgroup_table(result.labels, result.predictions, classes, values, positive, seed=INTERVAL_SEED)
    return replace(result, subgroups=table)


def evaluate_test(
    logits: np.ndarray,
    labels: np.ndarray,
    classes: list[str],
    val: LabelledLogits | None = None,
    calibration: Calibration | None = None,
) -> HeldOutResult:
    """Every test metric of the final run, from the test split's logits.

    `val` is the val split's logits and labels, to fit the temperature on; None when the
    model trained on val (then nothing is calibrated). The test logits are never fitted on.
    `calibration`: a temperature fitted already, measured on these images (an external set,
    search.final_model.external); then `val` is not used.
    """
    if calibration is None:
        calibration = calibrate((logits, labels), fit_on=val)
    probabilities = softmax(logits, calibration.temperature)
    predictions = logits.argmax(axis=1)  # what no temperature changes: the accuracies are the uncalibrated ones
    everyone = list(range(len(classes)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a class that is never predicted has no precision: reported as 0
        metrics = {
            "test_loss": calibration.nll_after,
            "test_acc": float(accuracy_score(labels, predictions)),
            "test_balanced_acc": float(balanced_accuracy_score(labels, predictions)),
            "test_macro_f1": float(f1_score(labels, predictions, labels=everyone, average="macro", zero_division=0)),
            "test_roc_auc": roc_auc(labels, probabilities, everyone),
            "test_ece": calibration.ece_after,
        }
        precision, recall, f1, support = precision_recall_fscore_support(
            labels, predictions, labels=everyone, zero_division=0
        )
        report = classification_report(
            labels, predictions, labels=everyone, target_names=classes, digits=4, zero_division=0
        )
    confusion = confusion_matrix(labels, predictions, labels=everyone)
    per_class = {
        name: {
            "precision": float(p),
            "recall": float(r),
            "f1": float(f),
            "support": int(s),
            "sensitivity": float(r),
            "specificity": float(sp),
        }
        for name, p, r, f, s, sp in zip(classes, precision, recall, f1, support, specificity(confusion), strict=True)
    }
    return HeldOutResult(
        metrics=metrics,
        intervals=score_intervals(labels, probabilities, stratified_resamples(labels, RESAMPLES, INTERVAL_SEED)),
        calibration=calibration,
        per_class=per_class,
        confusion=confusion,
        report=report + "\n" + one_vs_rest_table(classes, per_class),
        predictions=predictions,
        labels=labels,
        probabilities=probabilities,
    )


def specificity(confusion: np.ndarray) -> np.ndarray:
    """(C,) one-vs-rest TN / (TN + FP) per class: of the images of other classes, the share not called this one.

    0 for a class that every image belongs to (no negatives: undefined, reported as 0 like
    scikit-learn's zero_division=0).
    """
    confusion = confusion.astype(np.float64)
    negatives = confusion.sum() - confusion.sum(axis=1)  # images of the other classes: TN + FP
    false_positives = confusion.sum(axis=0) - np.diagonal(confusion)
    true_negatives = negatives - false_positives
    return np.divide(true_negatives, negatives, out=np.zeros_like(negatives), where=negatives > 0)


def one_vs_rest_table(classes: list[str], per_class: dict[str, dict[str, float]]) -> str:
    """The classification report's second table: each class against the rest."""
    width = max(len("class"), *(len(name) for name in classes))
    lines = ["one-vs-rest (sensitivity = recall)", "", f"{'class':>{width}}  sensitivity  specificity"]
    lines += [
        f"{name:>{width}}  {per_class[name]['sensitivity']:>11.4f}  {per_class[name]['specificity']:>11.4f}"
        for name in classes
    ]
    return "\n".join(lines) + "\n"


def logged_metrics(result: HeldOutResult) -> dict[str, float]:
    """The test metrics as the final run logs them: the scores, their interval bounds
    (test_acc_ci_low, test_acc_ci_high, ...), the temperature and the uncalibrated ECE and NLL."""
    calibration = result.calibration
    bounds = {}
    for key, interval in result.intervals.items():
        bounds[f"{key}_ci_low"], bounds[f"{key}_ci_high"] = interval.low, interval.high
    return {
        **result.metrics,
        **bounds,
        "temperature": calibration.temperature,
        "test_ece_uncalibrated": calibration.ece_before,
        "test_loss_uncalibrated": calibration.nll_before,
        **(subgroup_metrics(result.subgroups) if result.subgroups is not None else {}),
    }


def held_out_record(result: HeldOutResult) -> dict:
    """The result as metrics.json holds it (JSON types): scores, intervals, calibration, per class, confusion."""
    calibration = result.calibration
    return {
        "test": result.metrics,
        "intervals": {
            "confidence": CONFIDENCE,
            "method": INTERVAL_METHOD,
            "resamples": RESAMPLES,
            "seed": INTERVAL_SEED,
            **{key: [interval.low, interval.high] for key, interval in result.intervals.items()},
        },
        "calibration": {
            "temperature": calibration.temperature,
            "split": calibration.split,
            "fitted_on_images": calibration.fitted_on,
            "fitted_all_right": calibration.fitted_all_right,
            "ece_bins": ECE_BINS,
            "ece_before": calibration.ece_before,
            "ece_after": calibration.ece_after,
            "nll_before": calibration.nll_before,
            "nll_after": calibration.nll_after,
        },
        "per_class": result.per_class,
        "confusion_matrix": result.confusion.tolist(),
        **({"subgroups": result.subgroups.to_dict()} if result.subgroups is not None else {}),
    }


PER_CLASS_TABLE = "per_class_metrics.json"
"""The final run's per-class scores: one table artifact, not three metrics per class crowding the charts."""
PER_CLASS_COLUMNS = ("precision", "recall", "f1", "support", "sensitivity", "specificity")


def per_class_table(result: HeldOutResult) -> dict[str, list]:
    """Column class, then PER_CLASS_COLUMNS, one row per class (MLflow's log_table)."""
    rows = result.per_class.values()
    return {"class": list(result.per_class), **{key: [row[key] for row in rows] for key in PER_CLASS_COLUMNS}}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window: chosen before pyplot loads, so pyplot loads here
    import matplotlib.pyplot as plt

    return plt


def plot_confusion(result: HeldOutResult, classes: list[str], path: Path, title: str) -> Path:
    plt = _pyplot()
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


def plot_reliability(calibration: Calibration, path: Path, title: str) -> Path:
    """Accuracy against confidence per confidence bin, on the test split: before and (if calibrated) after."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(5.5, 5))
    axes.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="perfectly calibrated")
    before, after = ("calibrated networks averaged", "T_ens") if calibration.averaged else ("uncalibrated", "T")
    curves = [(before, calibration.reliability_before, calibration.ece_before)]
    if calibration.calibrated:
        label = f"calibrated, {after} = {calibration.temperature:.2f}"
        curves.append((label, calibration.reliability_after, calibration.ece_after))
    for label, bins, ece in curves:
        filled = bins.count > 0  # an empty bin has no accuracy to draw
        axes.plot(bins.confidence[filled], bins.accuracy[filled], marker="o", label=f"{label} (ECE {ece:.3f})")
    axes.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (top-class probability)", ylabel="accuracy", title=title)
    axes.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


SUMMARY_ROWS = (
    ("accuracy", "test_acc"),
    ("balanced accuracy", "test_balanced_acc"),
    ("macro F1", "test_macro_f1"),
    ("ROC-AUC (OvR macro)", "test_roc_auc"),
    (f"ECE ({ECE_BINS} bins)", "test_ece"),
    ("loss (NLL)", "test_loss"),
)


def summary_lines(result: HeldOutResult, metric: str, best_value: float | None, test_images: int) -> list[str]:
    """The short report: test scores with intervals, the weakest classes, the calibration, and the search's
    best validation score beside its test twin."""
    lines = [
        f"Test split: {test_images} images the search never saw "
        f"({round(100 * CONFIDENCE)} % CI: {INTERVAL_METHOD}, {RESAMPLES:,} resamples, seed {INTERVAL_SEED})"
    ]
    lines += [f"  {label:<20}{score_text(result, key)}" for label, key in SUMMARY_ROWS]
    for rate, where in (("sensitivity", ""), ("specificity", "; every class in classification_report.txt")):
        name, scores = min(result.per_class.items(), key=lambda item: item[1][rate])
        lines.append(f"  {'lowest ' + rate:<20}{scores[rate]:.4f} ({name}{where})")
    lines += calibration_lines(result.calibration)
    if best_value is not None:
        lines += comparison_lines(result, metric, best_value)
    if result.subgroups is not None:
        lines += subgroup_lines(result.subgroups)
    return lines


def score_text(result: HeldOutResult, key: str) -> str:
    """'0.9123  (95 % CI 0.8800–0.9400)'; the value alone for a metric without an interval (the loss)."""
    interval = result.intervals.get(key)
    if interval is None:
        return fixed(result.metrics[key], 4)
    return score_ci(result.metrics[key], interval, CONFIDENCE)


def calibration_lines(calibration: Calibration) -> list[str]:
    if not calibration.calibrated:
        return [
            "Calibration: none (temperature 1): the model trained on val, the one split a temperature could be "
            "fitted on without touching the test; retrain with --keep-val to calibrate"
        ]
    if calibration.averaged:
        lines = [
            f"Calibration: {calibration.averaged} probabilities averaged (members x views), each calibrated by its "
            f"network's own temperature fitted on {calibration.split}, then the average by T_ens = "
            f"{calibration.temperature:.3f} fitted on {calibration.split} (all in model.pt); on the test split "
            f"ECE {calibration.ece_before:.4f} -> {calibration.ece_after:.4f}, "
            f"NLL {calibration.nll_before:.4f} -> {calibration.nll_after:.4f} "
            "(before: the calibrated networks averaged; after: with T_ens; predictions unchanged)"
        ]
        return lines + unsteady_lines(calibration)
    lines = [
        (
            f"Calibration: temperature {calibration.temperature:.3f} fitted on {calibration.split}; on the test split "
            f"ECE {calibration.ece_before:.4f} -> {calibration.ece_after:.4f}, "
            f"NLL {calibration.nll_before:.4f} -> {calibration.nll_after:.4f} (predictions unchanged)"
        )
    ]
    return lines + unsteady_lines(calibration)


def unsteady_lines(calibration: Calibration) -> list[str]:
    """The warning for a temperature fitted on few val images, or on images all classified right."""
    if not calibration.unsteady:
        return []
    return [
        f"warning: the temperature was fitted on {calibration.fitted_on} val images"
        f"{', every one classified right (the fit can only sharpen)' if calibration.fitted_all_right else ''}: "
        f"it may be far from the one a larger val split would give"
    ]


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
