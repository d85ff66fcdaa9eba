"""One-vs-rest macro ROC-AUC: scikit-learn's on the whole test split, and its vectorised twin over resamples.

Both here, side by side, so that the final run's report and the comparison's intervals
compute the same number: the twin is checked against roc_auc resample by resample.

Pure (numpy, scikit-learn).
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score


def roc_auc(labels: np.ndarray, probabilities: np.ndarray, everyone: list[int]) -> float:
    """One-vs-rest macro ROC-AUC (scikit-learn); NaN when a class is missing from the test split (undefined)."""
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
