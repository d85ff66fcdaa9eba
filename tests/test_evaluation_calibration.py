"""Temperature scaling, NLL, ECE and the reliability bins: pure arrays.

Synthetic logits with a known temperature: labels drawn from softmax(z), the "model"
outputs t·z, so the temperature that calibrates it is t.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers.scores import scaled_logits

from search.evaluation.calibration import (
    ECE_BINS,
    TEMPERATURE_BOUNDS,
    expected_calibration_error,
    fit_temperature,
    nll,
    reliability,
    resampled_ece,
    softmax,
)

# ---------------------------------------------------------------- temperature scaling


def test_the_fit_recovers_a_known_temperature():
    logits, labels = scaled_logits(20_000, 3.0, seed=0)
    assert fit_temperature(logits, labels) == pytest.approx(3.0, rel=0.05)
    under, under_labels = scaled_logits(20_000, 0.5, seed=1)  # under-confident: T < 1 sharpens
    assert fit_temperature(under, under_labels) == pytest.approx(0.5, rel=0.05)


def test_the_fitted_temperature_minimises_the_nll_and_is_deterministic():
    logits, labels = scaled_logits(3000, 2.0, seed=2)
    fitted = fit_temperature(logits, labels)
    assert fitted == fit_temperature(logits, labels)
    for other in (0.9 * fitted, 1.1 * fitted, 1.0):
        assert nll(logits, labels, fitted) < nll(logits, labels, other)


def test_a_val_split_classified_right_with_room_to_spare_gets_a_sharpening_temperature_within_bounds():
    labels = np.arange(40) % 4
    logits = 10.0 * np.eye(4)[labels]  # the NLL keeps falling as T -> 0, until float64 sees no change
    fitted = fit_temperature(logits, labels)
    assert TEMPERATURE_BOUNDS[0] <= fitted < 1 and nll(logits, labels, fitted) < 1e-9


def test_nll_is_computed_from_logits_without_underflow():
    logits = np.array([[0.0, 800.0], [0.0, 0.0]])
    labels = np.array([0, 0])  # a confident mistake: probability exp(-800) underflows to 0
    assert nll(logits, labels) == pytest.approx((800 + np.log(2)) / 2)


# ---------------------------------------------------------------- ECE and the reliability bins


def test_ece_is_the_bin_weighted_gap_between_accuracy_and_confidence():
    logits, labels = scaled_logits(2000, 2.5, seed=8)
    probabilities = softmax(logits)
    bins = reliability(labels, probabilities)
    filled = bins.count > 0
    assert bins.count.sum() == len(labels) and len(bins.count) == ECE_BINS
    assert np.isnan(bins.accuracy[~filled]).all()
    gap = (bins.count[filled] * np.abs(bins.accuracy[filled] - bins.confidence[filled])).sum() / len(labels)
    assert expected_calibration_error(labels, probabilities) == pytest.approx(gap, abs=1e-12)


def test_resampled_ece_equals_the_ece_of_each_resample():
    logits, labels = scaled_logits(300, 2.0, seed=9)
    probabilities = softmax(logits)
    rows = np.random.default_rng(0).integers(0, len(labels), size=(20, len(labels)))
    expected = [expected_calibration_error(labels[row], probabilities[row]) for row in rows]
    np.testing.assert_allclose(resampled_ece(labels, probabilities, rows), expected, rtol=0, atol=1e-12)
