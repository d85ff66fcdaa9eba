"""The comparison's own statistics: paired tests, and the recommendation.

Pure arrays, no training: predictions are built to have known accuracies, known
discordant counts or known ties (the intervals of each model: test_evaluation_intervals.py).
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers.scores import noisy, predictions
from scipy.stats import binomtest

from search.comparison.results import Costs, ModelResult
from search.comparison.stats import describe_pair, recommend
from search.evaluation.intervals import Interval, stratified_resamples
from search.evaluation.paired import PairedTest, paired_test
from search.evaluation.predictions import Predictions


def always(correct: bool, labels: np.ndarray, classes: int) -> Predictions:
    return predictions(labels, labels if correct else (labels + 1) % classes, classes)


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
