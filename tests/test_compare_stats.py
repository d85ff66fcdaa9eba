"""The comparison's statistics: stratified resamples, metric intervals, paired tests, and the recommendation.

Pure arrays, no training: predictions are built to have known accuracies, known
discordant counts or known ties, and the vectorised metrics are checked against
scikit-learn (and the one roc_auc / ECE) computed one resample at a time.
"""

from __future__ import annotations

import math
import time
import warnings

import numpy as np
import pytest
from scipy.stats import binomtest
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

from search.comparison.results import COMPARED_METRICS, Costs, Interval, ModelResult, PairedTest, Predictions
from search.comparison.stats import (
    describe_pair,
    metric_intervals,
    paired_test,
    recommend,
    resampled_roc_auc,
    roc_auc,
    stratified_resamples,
)
from search.final_model.calibration import expected_calibration_error, softmax


def predictions(labels: np.ndarray, predicted: np.ndarray, classes: int, seed: int = 0) -> Predictions:
    """Probabilities whose argmax is `predicted`, with varied confidences (and so varied ranks)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(len(labels), classes))
    logits[np.arange(len(labels)), predicted] += 4.0
    return Predictions(
        keys=[f"img{i}.png" for i in range(len(labels))],
        labels=np.asarray(labels),
        probabilities=softmax(logits),
        classes=[f"class{c}" for c in range(classes)],
    )


def noisy(labels: np.ndarray, classes: int, accuracy: float, seed: int = 0) -> np.ndarray:
    """Predictions right on about `accuracy` of the images, a random other class elsewhere."""
    rng = np.random.default_rng(seed)
    wrong = rng.random(len(labels)) > accuracy
    return np.where(wrong, (labels + rng.integers(1, classes, len(labels))) % classes, labels)


def always(correct: bool, labels: np.ndarray, classes: int) -> Predictions:
    return predictions(labels, labels if correct else (labels + 1) % classes, classes)


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
def test_metric_intervals_take_seconds_at_full_size():
    labels = np.repeat(np.arange(11), 182)[:2000]
    result = predictions(labels, noisy(labels, 11, accuracy=0.85), 11)
    rows = stratified_resamples(labels)
    start = time.perf_counter()
    metric_intervals(result, rows)
    assert time.perf_counter() - start < 15


# --- paired test ----------------------------------------------------------------------------------------------


def test_identical_predictions_do_not_differ():
    labels = np.repeat(np.arange(3), 20)
    a = predictions(labels, noisy(labels, 3, accuracy=0.7), 3)
    pair = paired_test("cnn", a, "vit", a, stratified_resamples(labels, 200))
    assert pair.p_value == 1.0
    assert (pair.a_only, pair.b_only) == (0, 0)
    assert pair.difference == Interval(0.0, 0.0, 0.0)
    assert not pair.significant


def test_always_right_against_always_wrong():
    labels = np.repeat([0, 1], 20)
    pair = paired_test("cnn", always(True, labels, 2), "vit", always(False, labels, 2), stratified_resamples(labels))
    assert pair.difference.value == 1.0
    assert pair.difference.low == pair.difference.high == 1.0
    assert (pair.a_only, pair.b_only) == (40, 0)
    assert pair.p_value < 1e-6
    assert pair.significant


def test_mcnemar_on_a_known_case_either_way_round():
    """10 images only a gets right, 2 only b, 28 both: the binomial test of 2 in 12."""
    labels = np.repeat([0, 1], 20)
    a_right = np.r_[np.ones(10), np.zeros(2), np.ones(20), np.zeros(8)].astype(bool)
    b_right = np.r_[np.zeros(10), np.ones(2), np.ones(20), np.zeros(8)].astype(bool)
    a = predictions(labels, np.where(a_right, labels, 1 - labels), 2)
    b = predictions(labels, np.where(b_right, labels, 1 - labels), 2, seed=1)
    rows = stratified_resamples(labels, 500)
    pair = paired_test("cnn", a, "vit", b, rows)
    assert (pair.a_only, pair.b_only) == (10, 2)
    assert pair.p_value == pytest.approx(binomtest(2, 12).pvalue)
    assert pair.p_value == pytest.approx(0.0386, abs=1e-4)
    assert pair.difference.value == pytest.approx(8 / 40)
    reverse = paired_test("vit", b, "cnn", a, rows)
    assert reverse.p_value == pair.p_value
    assert reverse.difference.value == pytest.approx(-pair.difference.value)
    assert reverse.difference.low == pytest.approx(-pair.difference.high)


def test_the_difference_interval_is_paired():
    """Two models differing on one image only: unpaired intervals would overlap widely; the paired one is >= 0."""
    labels = np.repeat([0, 1, 2], 30)
    predicted = noisy(labels, 3, accuracy=0.6, seed=5)
    wrong = int(np.flatnonzero(predicted != labels)[0])
    fixed = predicted.copy()
    fixed[wrong] = labels[wrong]
    pair = paired_test(
        "hybrid", predictions(labels, fixed, 3), "cnn", predictions(labels, predicted, 3), stratified_resamples(labels)
    )
    assert pair.difference.value == pytest.approx(1 / 90)
    assert 0 <= pair.difference.low < pair.difference.high <= 4 / 90


@pytest.mark.parametrize("change", ["keys", "order", "labels"])
def test_predictions_on_different_images_are_refused(change):
    labels = np.repeat([0, 1], 10)
    a = predictions(labels, labels, 2)
    b = predictions(labels, labels, 2)
    if change == "keys":
        b = Predictions([*b.keys[:-1], "other.png"], b.labels, b.probabilities, b.classes)
    elif change == "order":
        b = Predictions(b.keys[::-1], b.labels, b.probabilities, b.classes)
    else:
        b = Predictions(b.keys, 1 - b.labels, b.probabilities, b.classes)
    with pytest.raises(ValueError, match="cnn and vit"):
        paired_test("cnn", a, "vit", b, stratified_resamples(labels, 10))


# --- words ----------------------------------------------------------------------------------------------------


def model(name: str, accuracy: float, latency: float, parameters: int = 1_000_000, reference: bool = False):
    costs = Costs(
        parameters=parameters, device="cpu", train_images_per_s=100.0, latency_ms={1: latency, 32: 10 * latency}
    )
    metrics = {"test_acc": Interval(accuracy, accuracy - 0.03, accuracy + 0.03)}
    return ModelResult(name, metrics, costs, np.zeros((2, 2), dtype=int), "run", reference=reference)


def pair(a: str, b: str, difference: float, low: float, high: float, p: float) -> PairedTest:
    return PairedTest(a, b, Interval(difference, low, high), p, a_only=10, b_only=5)


def test_recommend_one_model_alone():
    assert recommend([model("cnn", 0.9, 3.0)], []) == "Pick cnn: the only model compared."
    reference = model("vit_base_patch16_224", 0.95, 1.0, reference=True)
    assert recommend([model("cnn", 0.9, 3.0), reference], []) == (
        "Pick cnn: the only model compared besides the reference."
    )


def test_recommend_the_best_when_every_other_is_significantly_worse():
    models = [model("cnn", 0.912, 3.1), model("vit", 0.871, 1.0), model("hybrid", 0.887, 2.0)]
    pairs = [pair("cnn", "vit", 0.041, 0.02, 0.06, 0.003), pair("hybrid", "cnn", -0.025, -0.045, -0.005, 0.02)]
    assert recommend(models, pairs) == (
        "Pick cnn: the most accurate (test accuracy 91.2 %), and vit (-4.1 points, p = 0.003) "
        "and hybrid (-2.5 points, p = 0.02) are significantly worse."
    )


def test_recommend_the_best_when_it_is_also_the_fastest_of_those_not_significantly_worse():
    models = [model("cnn", 0.912, 3.1), model("vit", 0.90, 5.0)]
    assert recommend(models, [pair("vit", "cnn", -0.012, -0.04, 0.015, 0.3)]) == (
        "Pick cnn: the most accurate (test accuracy 91.2 %) and, of the models not significantly worse (vit), "
        "the fastest at inference (3.1 ms per image vs 5.0 ms)."
    )
    models.append(model("hybrid", 0.85, 0.5))
    pairs = [pair("vit", "cnn", -0.012, -0.04, 0.015, 0.3), pair("cnn", "hybrid", 0.062, 0.03, 0.09, 0.0004)]
    assert recommend(models, pairs) == (
        "Pick cnn: the most accurate (test accuracy 91.2 %) and, of the models not significantly worse (vit), "
        "the fastest at inference (3.1 ms per image vs 5.0 ms); hybrid (-6.2 points, p < 0.001) is significantly worse."
    )


@pytest.mark.parametrize("stored", ["best first", "chosen first"])
def test_recommend_a_faster_model_not_significantly_less_accurate(stored):
    models = [model("cnn", 0.912, 3.2), model("vit", 0.899, 1.1), model("hybrid", 0.905, 2.0)]
    pairs = [
        pair("cnn", "vit", 0.013, -0.015, 0.040, 0.42)
        if stored == "best first"
        else pair("vit", "cnn", -0.013, -0.040, 0.015, 0.42),
        pair("hybrid", "cnn", -0.007, -0.03, 0.02, 0.6),
    ]
    assert recommend(models, pairs) == (
        "Pick vit: 2.9x faster at inference than cnn (1.1 vs 3.2 ms per image) and not significantly less accurate "
        "(-1.3 points, 95 % CI [-4.0, 1.5], p = 0.42)."
    )


def test_recommend_breaks_a_latency_tie_with_fewer_parameters():
    models = [model("cnn", 0.912, 3.0, parameters=5_000_000), model("vit", 0.90, 3.0, parameters=2_000_000)]
    assert recommend(models, [pair("cnn", "vit", 0.012, -0.01, 0.035, 0.5)]) == (
        "Pick vit: as fast at inference as cnn (3.0 ms per image) with fewer parameters (2,000,000 vs 5,000,000) "
        "and not significantly less accurate (-1.2 points, 95 % CI [-3.5, 1.0], p = 0.5)."
    )


def test_recommend_never_picks_the_reference_and_needs_every_pair():
    reference = model("convnext_base", 0.97, 0.5, reference=True)
    models = [model("cnn", 0.912, 3.1), model("vit", 0.871, 1.0), reference]
    pairs = [pair("cnn", "vit", 0.041, 0.02, 0.06, 0.003), pair("convnext_base", "cnn", 0.06, 0.04, 0.08, 0.0001)]
    assert recommend(models, pairs).startswith("Pick cnn: the most accurate (test accuracy 91.2 %), and vit ")
    with pytest.raises(ValueError, match="no paired test between vit and cnn"):
        recommend(models, pairs[1:])
    with pytest.raises(ValueError):
        recommend([reference], [])


def test_describe_pair_speaks_for_the_more_accurate_model():
    assert describe_pair(pair("hybrid", "cnn", 0.013, -0.004, 0.030, 0.21)) == (
        "hybrid beats cnn by 1.3 points, 95 % CI [-0.4, 3.0], p = 0.21: not a significant difference"
    )
    assert describe_pair(pair("cnn", "hybrid", -0.013, -0.030, 0.004, 0.0042)) == (
        "hybrid beats cnn by 1.3 points, 95 % CI [-0.4, 3.0], p = 0.0042: significant"
    )
    assert describe_pair(pair("hybrid", "cnn", 0.0, -0.02, 0.02, 1.0)) == (
        "hybrid and cnn tie in accuracy, 95 % CI [-2.0, 2.0], p = 1.0: not a significant difference"
    )
    assert describe_pair(pair("vit", "cnn", 0.05, 0.03, 0.07, 0.00002)).endswith("p < 0.001: significant")
