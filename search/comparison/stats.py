"""The statistics of a comparison: bootstrap intervals, paired tests, and the one-sentence recommendation.

Every interval is a percentile interval of a bootstrap distribution, never a formula
that assumes normality: test metrics on a few hundred images are bounded and skewed.
The resamples are drawn once and shared by every model, so two models' intervals (and
their difference) come from the same images, resample by resample: the comparison is
paired, which is what makes small differences between models on one test split visible.

Pure (numpy, scipy, scikit-learn): testable without torch or MLflow.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy.stats import binomtest
from sklearn.metrics import roc_auc_score

from search.comparison.results import COMPARED_METRICS, Interval, ModelResult, PairedTest, Predictions
from search.comparison.wording import ci, finite, ms, p_text, percent, points, ratio
from search.final_model.calibration import expected_calibration_error, resampled_ece

RESAMPLES = 2000
CONFIDENCE = 0.95
_TAILS = (100 * (1 - CONFIDENCE) / 2, 100 * (1 + CONFIDENCE) / 2)
_NAN = float("nan")


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


def _check_resamples(resamples: np.ndarray, images: int) -> None:
    if resamples.ndim != 2 or resamples.shape[1] != images:
        raise ValueError(
            f"resamples of shape {resamples.shape} do not index {images} test images: drawn for another split?"
        )


def _interval(value: float, distribution: np.ndarray) -> Interval:
    """The value on all images, with the percentile interval of its bootstrap distribution (NaN if undefined)."""
    if np.isnan(value) or np.isnan(distribution).any():
        return Interval(float(value), _NAN, _NAN)
    low, high = np.percentile(distribution, _TAILS)
    return Interval(float(value), float(low), float(high))


def _negated(interval: Interval) -> Interval:
    """b - a from a - b."""
    return Interval(-interval.value, -interval.high, -interval.low)


# --- metrics with intervals -----------------------------------------------------------------------------------


def metric_intervals(predictions: Predictions, resamples: np.ndarray) -> dict[str, Interval]:
    """Each of COMPARED_METRICS on all test images, with its bootstrap interval over `resamples`."""
    return score_intervals(predictions.labels, predictions.probabilities, resamples)


def score_intervals(labels: np.ndarray, probabilities: np.ndarray, resamples: np.ndarray) -> dict[str, Interval]:
    """metric_intervals from the arrays alone: what final.py reports with its test scores, before any file exists."""
    _check_resamples(resamples, len(labels))
    classes = probabilities.shape[1]
    with_full = np.vstack([np.arange(len(labels))[None, :], resamples])
    counted = _counted_metrics(_confusions(labels, probabilities.argmax(axis=1), classes, with_full))
    intervals = {key: _interval(values[0], values[1:]) for key, values in counted.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a class missing from the test split: ROC-AUC is NaN, said so by the interval
        auc = roc_auc(labels, probabilities, list(range(classes)))
    intervals["test_roc_auc"] = _interval(auc, resampled_roc_auc(labels, probabilities, resamples))
    ece = resampled_ece(labels, probabilities, resamples)
    intervals["test_ece"] = _interval(expected_calibration_error(labels, probabilities), ece)
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


def roc_auc(labels: np.ndarray, probabilities: np.ndarray, everyone: list[int]) -> float:
    """One-vs-rest macro ROC-AUC (scikit-learn); NaN when a class is missing from the test split (undefined).

    Here, beside its vectorised twin, so that the final run's report and the comparison share both.
    """
    try:
        if len(everyone) == 2:
            return float(roc_auc_score(labels, probabilities[:, 1]))
        return float(roc_auc_score(labels, probabilities, multi_class="ovr", average="macro", labels=everyone))
    except ValueError:
        return float("nan")


def resampled_roc_auc(labels: np.ndarray, probabilities: np.ndarray, resamples: np.ndarray) -> np.ndarray:
    """(R,) ROC-AUC of each resample, as roc_auc computes it, vectorised over the resamples.

    Calling scikit-learn once per resample takes ~20 ms with 11 classes: 40 s for 2000
    resamples. A resample is the test split with each image weighted by how often it was
    drawn, so each class's AUC (the weighted share of positive-negative pairs ranked
    right, ties counting half) comes from one sort of the full split and cumulative
    sums over all resamples at once. One-vs-rest macro; two classes use column 1, as
    roc_auc does. NaN in a resample where a class has no image (undefined).
    """
    images, classes = probabilities.shape
    weights = np.bincount(
        (resamples + np.arange(len(resamples), dtype=np.int64)[:, None] * images).ravel(),
        minlength=len(resamples) * images,
    ).reshape(len(resamples), images)
    scored = [1] if classes == 2 else range(classes)
    return np.mean([_weighted_auc(labels == c, probabilities[:, c], weights) for c in scored], axis=0)


def _weighted_auc(positive: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(R,) AUC of `scores` for `positive` against the rest, one per row of image weights."""
    order = np.argsort(scores, kind="stable")
    sorted_scores, positive = scores[order], positive[order]
    # Images with the same score form a tie group; a positive gets, per resample, the weight of the
    # negatives below its group plus half of those inside it: half of (negatives before + through the group).
    first_of_group = np.r_[True, sorted_scores[1:] != sorted_scores[:-1]]
    starts, group = np.flatnonzero(first_of_group), np.cumsum(first_of_group) - 1
    ends = np.r_[starts[1:], len(scores)]
    negatives = weights[:, order] * ~positive
    below = np.concatenate([np.zeros((len(weights), 1)), np.cumsum(negatives, axis=1)], axis=1)
    ranked = 0.5 * (below[:, starts[group[positive]]] + below[:, ends[group[positive]]])
    positive_weights = weights[:, order[positive]]
    with np.errstate(divide="ignore", invalid="ignore"):
        return (positive_weights * ranked).sum(axis=1) / (positive_weights.sum(axis=1) * below[:, -1])


# --- paired test ----------------------------------------------------------------------------------------------


def paired_test(name_a: str, a: Predictions, name_b: str, b: Predictions, resamples: np.ndarray) -> PairedTest:
    """a's accuracy minus b's, with its paired bootstrap interval, and McNemar's exact test.

    Only meaningful on the same images in the same order with the same labels: anything
    else is refused, not compared. McNemar looks only at the images exactly one of the
    two gets right; under "equally accurate" each such image is a fair coin.
    """
    _check_same_images(name_a, a, name_b, b)
    _check_resamples(resamples, len(a.labels))
    difference = a.correct.astype(np.float64) - b.correct.astype(np.float64)
    a_only, b_only = int((difference > 0).sum()), int((difference < 0).sum())
    return PairedTest(
        a=name_a,
        b=name_b,
        difference=_interval(float(difference.mean()), difference[resamples].mean(axis=1)),
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


# --- words ----------------------------------------------------------------------------------------------------


def winner_first(pair: PairedTest) -> PairedTest:
    """The pair seen from the more accurate model's side (as stored on a tie), so a sentence and its counts agree."""
    if pair.difference.value >= 0 or not finite(pair.difference.value):
        return pair
    return PairedTest(pair.b, pair.a, _negated(pair.difference), pair.p_value, pair.b_only, pair.a_only)


def describe_pair(pair: PairedTest) -> str:
    """One line, from the more accurate model's side: by how much, how sure, and whether it is more than chance."""
    verdict = "significant" if pair.significant else "not a significant difference"
    won = winner_first(pair)
    sure = f"{ci(won.difference, CONFIDENCE)}, {p_text(pair.p_value)}: {verdict}"
    if not finite(won.difference.value):
        return f"{won.a} and {won.b}: accuracy difference not measured, {sure}"
    if won.difference.value == 0:
        return f"{won.a} and {won.b} tie in accuracy, {sure}"
    return f"{won.a} beats {won.b} by {points(won.difference.value)} points, {sure}"


def recommend(models: list[ModelResult], pairs: list[PairedTest]) -> str:
    """Which lightweight model to pick, in one sentence that follows from the numbers.

    The most accurate model, unless one that is not significantly less accurate
    (McNemar) is faster at inference (batch 1): then the fastest of those, fewer
    parameters breaking a tie. The reference model is never a candidate.
    """
    lightweight = [model for model in models if not model.reference]
    if not lightweight:
        raise ValueError("no lightweight model to recommend (only the reference)")
    if len(lightweight) == 1:
        alone = "the only model compared" if len(models) == 1 else "the only model compared besides the reference"
        return f"Pick {lightweight[0].name}: {alone}."
    best = max(lightweight, key=lambda model: (_accuracy(model), -_latency(model), -model.costs.parameters))
    others = [model for model in lightweight if model is not best]
    against_best = {model.name: versus(pairs, model.name, best.name) for model in others}
    close = [model for model in others if not against_best[model.name][1].significant]
    chosen = min([best, *close], key=lambda model: (_latency(model), model.costs.parameters, -_accuracy(model)))
    if chosen is not best:
        return _faster_sentence(chosen, best, *against_best[chosen.name])
    worse = [model for model in others if all(model is not near for near in close)]
    return _best_sentence(best, close, worse, against_best)


def _best_sentence(
    best: ModelResult,
    close: list[ModelResult],
    worse: list[ModelResult],
    against_best: dict[str, tuple[Interval, PairedTest]],
) -> str:
    """The most accurate model is picked: because every other is significantly worse, or it is also the fastest."""
    accuracy = f"test accuracy {percent(_accuracy(best))}"
    if not close:
        return f"Pick {best.name}: the most accurate ({accuracy}), and {_worse_clause(worse, against_best)}."
    fastest = all(_latency(best) < _latency(model) for model in close)
    speed = "the fastest at inference" if fastest else "at least as fast at inference"
    sentence = (
        f"Pick {best.name}: the most accurate ({accuracy}) and, of the models not significantly worse "
        f"({_join([m.name for m in close])}), {speed} ({ms(_latency(best))} ms per image vs "
        f"{_join([ms(_latency(m)) for m in close])} ms)"
    )
    if worse:
        sentence += f"; {_worse_clause(worse, against_best)}"
    return sentence + "."


def _worse_clause(worse: list[ModelResult], against_best: dict[str, tuple[Interval, PairedTest]]) -> str:
    """'vit (-4.1 points, p = 0.003) and hybrid (-2.5 points, p = 0.02) are significantly worse'."""
    named = [
        f"{m.name} ({points(against_best[m.name][0].value)} points, {p_text(against_best[m.name][1].p_value)})"
        for m in worse
    ]
    return f"{_join(named)} {'is' if len(worse) == 1 else 'are'} significantly worse"


def _faster_sentence(chosen: ModelResult, best: ModelResult, difference: Interval, pair: PairedTest) -> str:
    """A less accurate model is picked: it is faster (or as fast and smaller), and not significantly less accurate."""
    if _latency(chosen) < _latency(best):
        edge = (
            f"{ratio(_latency(best) / _latency(chosen))} faster at inference than {best.name} "
            f"({ms(_latency(chosen))} vs {ms(_latency(best))} ms per image)"
        )
    else:
        edge = (
            f"as fast at inference as {best.name} ({ms(_latency(chosen))} ms per image) with fewer parameters "
            f"({chosen.costs.parameters:,} vs {best.costs.parameters:,})"
        )
    return (
        f"Pick {chosen.name}: {edge} and not significantly less accurate "
        f"({points(difference.value)} points, {ci(difference, CONFIDENCE)}, {p_text(pair.p_value)})."
    )


def versus(pairs: list[PairedTest], name: str, other: str) -> tuple[Interval, PairedTest]:
    """`name`'s accuracy minus `other`'s, whichever way round their pair was stored.

    Public because the report reads the reference's pairs (stored reference first) from the lightweight side.
    """
    for pair in pairs:
        if (pair.a, pair.b) == (name, other):
            return pair.difference, pair
        if (pair.a, pair.b) == (other, name):
            return _negated(pair.difference), pair
    raise ValueError(f"no paired test between {name} and {other}: cannot tell whether they differ")


def _accuracy(model: ModelResult) -> float:
    return model.metrics["test_acc"].value


def _latency(model: ModelResult) -> float:
    """Milliseconds per image at batch 1: what a single request waits."""
    return model.costs.latency_ms[1]


def _join(items: list[str]) -> str:
    """a; a and b; a, b and c."""
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"
