"""Two models on the same test images: the paired bootstrap interval of their accuracy difference, and McNemar.

Each model's own intervals come from search.evaluation.intervals, drawn from resamples
shared by every model; here the same resamples give the paired bootstrap interval of a
difference in accuracy, and McNemar's exact test says whether it is more than chance.
compare.py judges the three architectures with it, final.py an ensemble (or test-time
augmentation) against its best single member.

Pure (numpy, scipy): testable without torch or MLflow.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import binomtest

from search.evaluation.intervals import Interval, check_resamples, percentile_interval
from search.evaluation.predictions import Predictions

SIGNIFICANCE = 0.05
"""A paired difference with McNemar's p below this is called significant."""


@dataclass(frozen=True)
class PairedTest:
    """Two models on the same test images: a - b in accuracy, and whether that is more than chance."""

    a: str
    b: str
    difference: Interval
    """Accuracy of a minus accuracy of b (fractions), with its paired bootstrap interval."""
    p_value: float
    """McNemar's exact test on the images exactly one of the two gets right."""
    a_only: int
    """Images a gets right and b wrong."""
    b_only: int

    @property
    def significant(self) -> bool:
        return self.p_value < SIGNIFICANCE


def paired_test(name_a: str, a: Predictions, name_b: str, b: Predictions, resamples: np.ndarray) -> PairedTest:
    """a's accuracy minus b's, with its paired bootstrap interval, and McNemar's exact test.

    Only meaningful on the same images in the same order with the same labels: anything
    else is refused, not compared. McNemar looks only at the images exactly one of the
    two gets right; under "equally accurate" each such image is a fair coin.
    """
    _check_same_images(name_a, a, name_b, b)
    check_resamples(resamples, len(a.labels))
    difference = a.correct.astype(np.float64) - b.correct.astype(np.float64)
    a_only, b_only = int((difference > 0).sum()), int((difference < 0).sum())
    return PairedTest(
        a=name_a,
        b=name_b,
        difference=percentile_interval(float(difference.mean()), difference[resamples].mean(axis=1)),
        p_value=mcnemar(a_only, b_only),
        a_only=a_only,
        b_only=b_only,
    )


def mcnemar(a_only: int, b_only: int) -> float:
    """Two-sided exact McNemar p-value: binomial test of the discordant images; 1.0 when there are none."""
    if a_only + b_only == 0:
        return 1.0
    return float(binomtest(min(a_only, b_only), n=a_only + b_only, p=0.5).pvalue)


def _check_same_images(name_a: str, a: Predictions, name_b: str, b: Predictions) -> None:
    pair = f"{name_a} and {name_b}"
    if list(a.keys) != list(b.keys):
        raise ValueError(f"{pair} were tested on different images (or in a different order): not comparable")
    if a.labels.shape != b.labels.shape or not np.array_equal(a.labels, b.labels):
        raise ValueError(f"{pair} give the same test images different labels: not comparable")
    if list(a.classes) != list(b.classes):
        raise ValueError(f"{pair} have different classes ({a.classes} vs {b.classes}): not comparable")
