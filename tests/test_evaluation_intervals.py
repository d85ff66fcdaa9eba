"""Bootstrap intervals of the test metrics: stratified resamples, the vectorised metrics, ROC-AUC.

Pure arrays, no training: predictions are built to have known accuracies, and the
vectorised metrics are checked against scikit-learn (and the one roc_auc / ECE)
computed one resample at a time.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from helpers.scores import noisy, predictions
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

from search.evaluation.calibration import expected_calibration_error
from search.evaluation.intervals import COMPARED_METRICS, metric_intervals, stratified_resamples
from search.evaluation.roc_auc import resampled_roc_auc, roc_auc

# --- resamples ------------------------------------------------------------------------------------------------


def test_resamples_keep_each_class_count_and_draw_within_the_class():
    labels = np.array([0] * 30 + [1] * 5 + [2] * 12 + [0] * 3)
    rows = stratified_resamples(labels, resamples=50, seed=3)
    assert rows.shape == (50, len(labels))
    assert np.issubdtype(rows.dtype, np.integer)
    for row in rows:
        np.testing.assert_array_equal(np.bincount(labels[row], minlength=3), np.bincount(labels))
        np.testing.assert_array_equal(labels[row], labels)  # each position keeps its class
    # with replacement: some image drawn twice in a row, and the rows differ from one another
    assert any(len(np.unique(row)) < len(labels) for row in rows)
    assert len({row.tobytes() for row in rows}) == 50


def test_resamples_are_reproducible_with_a_seed_and_differ_with_another():
    labels = np.repeat(np.arange(4), 25)
    np.testing.assert_array_equal(stratified_resamples(labels, 20, seed=7), stratified_resamples(labels, 20, seed=7))
    assert not np.array_equal(stratified_resamples(labels, 20, seed=7), stratified_resamples(labels, 20, seed=8))


# --- metric intervals -----------------------------------------------------------------------------------------


def sklearn_counted(labels: np.ndarray, predicted: np.ndarray, classes: int) -> dict[str, float]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # classes predicted but absent from y_true, as the vectorised code ignores
        return {
            "test_acc": accuracy_score(labels, predicted),
            "test_balanced_acc": balanced_accuracy_score(labels, predicted),
            "test_macro_f1": f1_score(labels, predicted, labels=range(classes), average="macro", zero_division=0),
        }


def test_vectorised_metrics_equal_sklearn_on_the_full_set():
    labels = np.repeat(np.arange(5), [40, 10, 25, 3, 22])
    predicted = noisy(labels, 5, accuracy=0.6, seed=1)
    predicted[predicted == 3] = 4  # class 3 never predicted: precision and F1 undefined, counted 0
    result = predictions(labels, predicted, 5)
    intervals = metric_intervals(result, stratified_resamples(labels, 100))
    assert list(intervals) == list(COMPARED_METRICS)
    for key, expected in sklearn_counted(labels, predicted, 5).items():
        assert intervals[key].value == pytest.approx(expected, abs=1e-12), key
    assert intervals["test_roc_auc"].value == roc_auc(labels, result.probabilities, list(range(5)))
    assert intervals["test_ece"].value == expected_calibration_error(labels, result.probabilities)


def test_vectorised_metrics_equal_sklearn_on_each_resample_even_with_a_class_missing():
    """One resample row as the whole distribution: its interval's ends are that resample's score."""
    labels = np.repeat(np.arange(4), [20, 6, 14, 10])
    predicted = noisy(labels, 4, accuracy=0.5, seed=2)
    result = predictions(labels, predicted, 4)
    rng = np.random.default_rng(0)
    rows = rng.integers(0, len(labels), size=(8, len(labels)))  # not stratified
    rows[0] = rng.choice(np.flatnonzero((labels != 1) & (predicted != 1)), len(labels))  # class 1 nowhere: F1 0
    rows[1] = rng.choice(np.flatnonzero(labels != 1), len(labels))  # class 1 predicted, never true
    assert 1 not in labels[rows[0]] and 1 not in predicted[rows[0]]
    assert 1 not in labels[rows[1]] and 1 in predicted[rows[1]]
    for row in rows:
        interval = metric_intervals(result, row[None, :])
        for key, expected in sklearn_counted(labels[row], predicted[row], 4).items():
            assert interval[key].low == interval[key].high == pytest.approx(expected, abs=1e-12), key
        assert interval["test_ece"].low == expected_calibration_error(labels[row], result.probabilities[row])


@pytest.mark.parametrize("classes", [2, 3, 6])
def test_resampled_roc_auc_equals_report_roc_auc_resample_by_resample(classes):
    labels = np.repeat(np.arange(classes), 30)
    result = predictions(labels, noisy(labels, classes, accuracy=0.7, seed=classes), classes)
    probabilities = result.probabilities
    probabilities[:40] = np.round(probabilities[:40], 1)  # tied scores, which count half
    probabilities[:40] /= probabilities[:40].sum(axis=1, keepdims=True)
    rows = stratified_resamples(labels, 25, seed=1)
    expected = [roc_auc(labels[row], probabilities[row], list(range(classes))) for row in rows]
    np.testing.assert_allclose(resampled_roc_auc(labels, probabilities, rows), expected, rtol=0, atol=1e-12)


def test_roc_auc_of_a_class_missing_from_the_test_split_gives_a_nan_interval():
    labels = np.repeat([0, 1], 20)  # three classes, the third never in the test split
    result = predictions(labels, noisy(labels, 3, accuracy=0.8), 3)
    intervals = metric_intervals(result, stratified_resamples(labels, 50))
    auc = intervals["test_roc_auc"]
    assert math.isnan(auc.value) and math.isnan(auc.low) and math.isnan(auc.high)
    assert intervals["test_acc"].low <= intervals["test_acc"].value <= intervals["test_acc"].high


def test_intervals_contain_their_estimate_and_narrow_with_more_images():
    labels = np.repeat(np.arange(3), 40)
    predicted = noisy(labels, 3, accuracy=0.75, seed=4)
    small = predictions(labels, predicted, 3)
    big = predictions(np.tile(labels, 4), np.tile(predicted, 4), 3)  # the same scores on 4x the images
    small_intervals = metric_intervals(small, stratified_resamples(small.labels, 400))
    big_intervals = metric_intervals(big, stratified_resamples(big.labels, 400))
    for key in COMPARED_METRICS:
        for interval in (small_intervals[key], big_intervals[key]):
            assert interval.low < interval.high, key
            assert interval.contains(interval.value), key
        # the width shrinks like 1/sqrt(N): about half
        assert big_intervals[key].high - big_intervals[key].low < 0.7 * (
            small_intervals[key].high - small_intervals[key].low
        ), key


def test_resamples_for_another_split_are_refused():
    labels = np.repeat([0, 1], 10)
    with pytest.raises(ValueError, match="resamples"):
        metric_intervals(predictions(labels, labels, 2), stratified_resamples(np.repeat([0, 1], 11), 5))


@pytest.mark.slow
def test_metric_intervals_take_seconds_at_full_size(monkeypatch):
    """Seconds, not minutes: scikit-learn's ROC-AUC (~20 ms a call with 11 classes) runs once, on the whole split,
    never once per resample (a timing said so once; a busy machine made it flaky)."""
    from search.evaluation import roc_auc as module

    calls, score = [], module.roc_auc_score
    monkeypatch.setattr(module, "roc_auc_score", lambda *args, **kwargs: calls.append(1) or score(*args, **kwargs))
    labels = np.repeat(np.arange(11), 182)[:2000]
    result = predictions(labels, noisy(labels, 11, accuracy=0.85), 11)
    intervals = metric_intervals(result, stratified_resamples(labels))
    assert len(calls) == 1
    for key, interval in intervals.items():
        assert interval.low <= interval.value <= interval.high, key
