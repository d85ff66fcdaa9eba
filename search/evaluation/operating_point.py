"""An operating point: a threshold on one class's calibrated probability, chosen on val, reported on test.

A classifier gives probabilities; a clinic acts on a yes or no. An image is flagged as
the positive class when that class's calibrated probability is at least the threshold.
The threshold is chosen on the val split to meet a target there, never on the test
split, which then reports what the threshold achieves on images nobody chose it on:

- sensitivity=s: the highest threshold that still flags at least a share s of val's
  positive images. It is always a positive image's score (the k-th highest, k the
  fewest positives that make the share); images tied with it are flagged too, which
  only raises the sensitivity.
- specificity=s: the lowest threshold that leaves at least a share s of val's other
  images unflagged: just above the score of the m-th lowest of them (m the fewest that
  make the share), so that it and every image tied with it stay unflagged.

Sensitivity is TP / (TP + FN) over the positive images, specificity TN / (TN + FP)
over the others; NaN where a split has none of them. The test's rates get percentile
bootstrap intervals over the evaluation's stratified resamples (search.evaluation.intervals),
the very rows the test's other intervals are drawn from with the same seed.

Pure (numpy): testable on arrays.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from search.evaluation.formatting import fixed, score_ci
from search.evaluation.intervals import CONFIDENCE, RESAMPLES, Interval, percentile_interval, stratified_resamples

RATES = ("sensitivity", "specificity")
CHOSEN_ON = "val"
"""The split the threshold is chosen on: the test is only reported on."""


class NoImagesToChooseOn(ValueError):
    """The val split has none of the images the target counts (no positives, or nothing but positives)."""


# ---------------------------------------------------------------- the rules


def threshold_for_sensitivity(scores: np.ndarray, positives: np.ndarray, sensitivity: float) -> float:
    """The highest threshold t with share(scores[positives] >= t) >= sensitivity."""
    positive_scores = np.sort(np.asarray(scores, dtype=np.float64)[np.asarray(positives, dtype=bool)])[::-1]
    if len(positive_scores) == 0:
        raise NoImagesToChooseOn("no image of the positive class to reach a sensitivity on")
    # The share each count of flagged positives gives, compared as rates() computes it: no rounding surprise.
    shares = np.arange(1, len(positive_scores) + 1) / len(positive_scores)
    return float(positive_scores[int(np.argmax(shares >= sensitivity))])


def threshold_for_specificity(scores: np.ndarray, positives: np.ndarray, specificity: float) -> float:
    """The lowest threshold t with share(scores[~positives] < t) >= specificity."""
    negative_scores = np.sort(np.asarray(scores, dtype=np.float64)[~np.asarray(positives, dtype=bool)])
    if len(negative_scores) == 0:
        raise NoImagesToChooseOn("no image outside the positive class to reach a specificity on")
    shares = np.arange(1, len(negative_scores) + 1) / len(negative_scores)
    kept_below = negative_scores[int(np.argmax(shares >= specificity))]
    return float(np.nextafter(kept_below, np.inf))  # the least float above it: it and its ties stay unflagged


THRESHOLD_RULES: dict[str, Callable[[np.ndarray, np.ndarray, float], float]] = {
    "sensitivity": threshold_for_sensitivity,
    "specificity": threshold_for_specificity,
}
"""The rule for each target (search.records.operating_point.TARGETS)."""


def choose_threshold(scores: np.ndarray, positives: np.ndarray, target: str, value: float) -> float:
    """The threshold `target`'s rule gives on these (val) scores; NoImagesToChooseOn where it has nothing to count."""
    if target not in THRESHOLD_RULES:
        raise ValueError(f"{target}: an operating point targets one of {', '.join(THRESHOLD_RULES)}")
    return THRESHOLD_RULES[target](scores, positives, value)


# ---------------------------------------------------------------- the rates


def rates(scores: np.ndarray, positives: np.ndarray, threshold: float) -> dict[str, float]:
    """Sensitivity and specificity of flagging scores >= threshold (NaN where the split has no such images)."""
    every = np.arange(len(scores))[None, :]
    return {name: float(values[0]) for name, values in _resampled_rates(scores, positives, threshold, every).items()}


def rate_intervals(
    scores: np.ndarray, positives: np.ndarray, threshold: float, resamples: np.ndarray
) -> dict[str, Interval]:
    """Sensitivity and specificity at the threshold, each with its percentile interval over `resamples`."""
    point = rates(scores, positives, threshold)
    drawn = _resampled_rates(scores, positives, threshold, resamples)
    return {name: percentile_interval(point[name], drawn[name]) for name in RATES}


def _resampled_rates(
    scores: np.ndarray, positives: np.ndarray, threshold: float, rows: np.ndarray
) -> dict[str, np.ndarray]:
    """(R,) sensitivity and specificity of each row of image indices."""
    positives = np.asarray(positives, dtype=bool)
    flagged = np.asarray(scores, dtype=np.float64) >= threshold
    counted = {
        "sensitivity": (positives[rows].sum(axis=1), (flagged & positives)[rows].sum(axis=1)),
        "specificity": ((~positives)[rows].sum(axis=1), (~flagged & ~positives)[rows].sum(axis=1)),
    }
    # A row without such images: NaN, shown as n/a (never a division by zero).
    return {name: np.where(total > 0, hits / np.maximum(total, 1), np.nan) for name, (total, hits) in counted.items()}


def split_rates(
    probabilities: np.ndarray, labels: np.ndarray, positive: int, threshold: float, seed: int
) -> dict[str, Interval]:
    """A split's sensitivity and specificity at the threshold on class `positive`'s probability, with intervals
    over the stratified resamples that split's other intervals use (RESAMPLES rows, `seed`)."""
    labels = np.asarray(labels)
    resamples = stratified_resamples(labels, RESAMPLES, seed)
    return rate_intervals(probabilities[:, positive], labels == positive, threshold, resamples)


def rates_record(intervals: dict[str, Interval]) -> dict[str, dict[str, float]]:
    """{'sensitivity': {'value', 'low', 'high'}, 'specificity': {...}}: as metrics.json holds a split's rates."""
    return {name: {"value": it.value, "low": it.low, "high": it.high} for name, it in intervals.items()}


# ---------------------------------------------------------------- the result


@dataclass(frozen=True, kw_only=True)
class OperatingPoint:
    """The threshold chosen on val and what it achieves there and on the test split."""

    positive: str
    """The class flagged: its name."""
    target: str
    """'sensitivity' or 'specificity': what the threshold was chosen to reach on val."""
    target_value: float
    threshold: float
    """An image is flagged when the positive class's calibrated probability is >= this."""
    val: dict[str, float]
    """sensitivity and specificity on val, where the threshold was chosen (at least the target)."""
    test: dict[str, Interval]
    """sensitivity and specificity on the test split, with their CONFIDENCE intervals."""

    def model_record(self) -> dict:
        """What model.pt and predict.py carry: enough to apply it."""
        return {
            "positive": self.positive,
            "threshold": self.threshold,
            "target": self.target,
            "target_value": self.target_value,
        }

    def record(self) -> dict:
        """metrics.json's "operating_point"."""
        return {
            "positive": self.positive,
            "target": self.target,
            "target_value": self.target_value,
            "threshold": self.threshold,
            "chosen_on": CHOSEN_ON,
            "val": dict(self.val),
            "test": rates_record(self.test),
        }

    def metrics(self) -> dict[str, float]:
        """The final run's op_* metrics: the threshold, val's rates, the test's rates and their interval bounds."""
        scores = {"op_threshold": self.threshold}
        scores.update({f"op_val_{name}": value for name, value in self.val.items()})
        for name, interval in self.test.items():
            scores[f"op_test_{name}"] = interval.value
            scores[f"op_test_{name}_ci_low"], scores[f"op_test_{name}_ci_high"] = interval.low, interval.high
        return scores

    def rule(self) -> str:
        """'p(malignant) >= 0.3124': the rule as a person reads it."""
        return f"p({self.positive}) >= {threshold_text(self.threshold)}"

    def chosen(self) -> str:
        """'chosen on val for sensitivity >= 0.95 (val: sensitivity 0.9630, specificity 0.8000)'."""
        achieved = ", ".join(f"{name} {fixed(self.val[name], 4)}" for name in RATES)
        return f"chosen on {CHOSEN_ON} for {self.target} >= {self.target_value:g} ({CHOSEN_ON}: {achieved})"

    def lines(self) -> list[str]:
        """final.py's closing lines on it."""
        lines = [f"Operating point: flag {self.rule()}, {self.chosen()}"]
        for name in RATES:
            interval = self.test[name]
            lines.append(f"  {'test ' + name:<20}{interval_text(interval)}")
        return lines


def threshold_text(threshold: float) -> str:
    """'0.3124'; every digit where four would round it to 0 or 1, which a saturated softmax makes common
    (0.9999999999999984 is not 1: the images at exactly 1.0 and below it differ)."""
    short = f"{threshold:.4f}"
    return short if 0 < float(short) < 1 else repr(float(threshold))


def interval_text(interval: Interval) -> str:
    """'0.9123  (95 % CI 0.8800–0.9400)'; 'n/a' bounds where undefined."""
    return score_ci(interval.value, interval, CONFIDENCE)


def operating_point(
    classes: list[str],
    positive: int,
    target: str,
    target_value: float,
    val: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    seed: int,
) -> OperatingPoint:
    """The threshold chosen on val's (probabilities, labels), then measured on test's (probabilities, labels):
    calibrated probabilities, (N, C), with the true class indices."""
    val_probabilities, val_labels = val
    val_scores, val_positives = val_probabilities[:, positive], np.asarray(val_labels) == positive
    threshold = choose_threshold(val_scores, val_positives, target, target_value)
    test_probabilities, test_labels = test
    return OperatingPoint(
        positive=classes[positive],
        target=target,
        target_value=target_value,
        threshold=threshold,
        val=rates(val_scores, val_positives, threshold),
        test=split_rates(test_probabilities, test_labels, positive, threshold, seed),
    )
