"""Temperature scaling (Guo et al., 2017) and the measures of calibration: pure arrays, no torch.

A network's softmax tends to be over-confident. Temperature scaling divides every logit
by one scalar T > 0, chosen to minimise the negative log-likelihood (NLL) on images the
model did not train on: the val split, never the test split, which is looked at once,
to report. Dividing by a positive T keeps each image's ranking of the classes, so the
predictions (and accuracy) stay as they were; only the confidences move.

The logits come from the model's one pass over val and test (search.final_model.retrain,
which runs the model); everything here works on the arrays that pass returns.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import logsumexp

ECE_BINS = 15
CALIBRATION_SPLIT = "val"
"""The one split a temperature is fitted on, and only when the model did not train on it (final.py --keep-val)."""
TEMPERATURE_BOUNDS = (0.05, 20.0)
"""Where the fit looks for T. A model that classifies every val image right with room to spare
has its NLL still falling as T -> 0: the bound keeps T positive and the logits finite."""
FEW_CALIBRATION_IMAGES = 100
"""Below this many val images a fitted temperature earns a warning: one scalar, but fitted on a handful of
confident answers it can land far from the one a larger split would give."""

LabelledLogits = tuple[np.ndarray, np.ndarray]
"""(N, C) logits and their (N,) true class indices, of one split."""


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Class probabilities of logits / temperature, in float64."""
    scaled = logits.astype(np.float64) / temperature
    shifted = scaled - scaled.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the true classes under softmax(logits / temperature).

    From the logits (log-sum-exp), not from probabilities: a confident mistake's tiny
    probability would underflow to 0, and its log to -inf.
    """
    scaled = logits.astype(np.float64) / temperature
    return float(np.mean(logsumexp(scaled, axis=1) - scaled[np.arange(len(labels)), labels]))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T in TEMPERATURE_BOUNDS that minimises nll(logits, labels, T): fit it on the val split only.

    Searched over log T, where the NLL has a single minimum (it is convex in 1/T), with
    scipy's bounded Brent method: deterministic, and about thirty NLL evaluations.
    """
    low, high = np.log(TEMPERATURE_BOUNDS)
    found = minimize_scalar(
        lambda log_t: nll(logits, labels, float(np.exp(log_t))),
        bounds=(low, high),
        method="bounded",
        options={"xatol": 1e-6},
    )
    return float(np.exp(found.x))


# ---------------------------------------------------------------- reliability and ECE


@dataclass(frozen=True)
class Reliability:
    """A reliability diagram's numbers: predictions binned by confidence (top-class probability).

    Bin b holds confidences in (b/bins, (b+1)/bins]; a confidence of exactly 0 joins bin 0.
    """

    count: np.ndarray
    """(bins,) predictions in each bin."""
    accuracy: np.ndarray
    """(bins,) share of them that are right; NaN for an empty bin."""
    confidence: np.ndarray
    """(bins,) their mean confidence; NaN for an empty bin."""


def _binned(labels: np.ndarray, probabilities: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each image's confidence bin, confidence and correctness (1.0 or 0.0)."""
    confidence = probabilities.max(axis=1)
    correct = (probabilities.argmax(axis=1) == labels).astype(np.float64)
    which = np.digitize(confidence, np.linspace(0, 1, bins + 1)[1:-1], right=True)
    return which, confidence, correct


def _bin_sums(which: np.ndarray, values: np.ndarray, rows: np.ndarray, bins: int) -> np.ndarray:
    """(R, bins) sums of `values` over each row's images, bin by bin, in one bincount (rows kept apart by offsets)."""
    offsets = np.arange(len(rows), dtype=np.int64)[:, None] * bins
    sums = np.bincount((which[rows] + offsets).ravel(), weights=values[rows].ravel(), minlength=len(rows) * bins)
    return sums.reshape(len(rows), bins)


def reliability(labels: np.ndarray, probabilities: np.ndarray, bins: int = ECE_BINS) -> Reliability:
    which, confidence, correct = _binned(labels, probabilities, bins)
    everyone = np.arange(len(labels))[None, :]
    count = np.bincount(which, minlength=bins)
    with np.errstate(invalid="ignore"):  # an empty bin: 0 / 0, NaN, drawn as a gap
        accuracy = _bin_sums(which, correct, everyone, bins)[0] / count
        mean_confidence = _bin_sums(which, confidence, everyone, bins)[0] / count
    return Reliability(count, accuracy, mean_confidence)


def resampled_ece(labels: np.ndarray, probabilities: np.ndarray, rows: np.ndarray, bins: int = ECE_BINS) -> np.ndarray:
    """(R,) ECE of each row of image indices (a bootstrap resample), vectorised over the rows.

    The ECE is the bin-size-weighted mean of |accuracy - mean confidence| over the bins:
    sum over bins of |sum over the bin's images of (correct - confidence)| / N. Each image
    is binned once; a row only reweights the images.
    """
    which, confidence, correct = _binned(labels, probabilities, bins)
    gaps = _bin_sums(which, correct - confidence, rows, bins)
    return np.abs(gaps).sum(axis=1) / rows.shape[1]


def expected_calibration_error(labels: np.ndarray, probabilities: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE with equal-width confidence bins (Guo et al., 2017): 0 for a perfectly calibrated model.

    scikit-learn has no multiclass ECE; this is resampled_ece with every image, once.
    """
    return float(resampled_ece(labels, probabilities, np.arange(len(labels))[None, :], bins)[0])


# ---------------------------------------------------------------- the calibration of a final model


@dataclass(frozen=True)
class Calibration:
    """A temperature and what it did to the test split's probabilities."""

    temperature: float
    """Divides the logits before the softmax; 1.0 when the model is not calibrated."""
    split: str | None
    """The split the temperature was fitted on (CALIBRATION_SPLIT), or None: the model trained on
    every image but the test's, so none was left to fit it on and the probabilities are the model's own."""
    fitted_on: int
    """Images the temperature was fitted on (0 when not calibrated)."""
    fitted_all_right: bool
    """Every one of them classified right: then the NLL only falls as T shrinks, and T says how far the
    search went more than how sure the model should be."""
    ece_before: float
    """Test ECE (ECE_BINS bins) of softmax(logits)."""
    ece_after: float
    """Test ECE of softmax(logits / temperature): the run's test_ece."""
    nll_before: float
    """Test NLL of softmax(logits)."""
    nll_after: float
    """Test NLL of softmax(logits / temperature): the run's test_loss."""
    reliability_before: Reliability
    reliability_after: Reliability
    averaged: int = 0
    """Where the probabilities average several networks or views (an ensemble, test-time flips): how many; each
    was calibrated with its own temperature, and `temperature` is then T_ens, fitted to the average's
    log-probabilities (1 where nothing was fitted): 'before' is the calibrated average, 'after' it rescaled by
    T_ens. 0: one network's logits / temperature."""

    @property
    def calibrated(self) -> bool:
        return self.split is not None

    @property
    def unsteady(self) -> bool:
        """Fitted on too few images, or on images all classified right: a temperature to doubt."""
        return self.calibrated and (self.fitted_on < FEW_CALIBRATION_IMAGES or self.fitted_all_right)


def calibrate(test: LabelledLogits, fit_on: LabelledLogits | None) -> Calibration:
    """Fit T on `fit_on` (the val split's logits and labels; None: T = 1) and measure it on `test`.

    The test split's logits never reach the fit: they are only measured, before and after.
    """
    if fit_on is None:
        return measured(test, 1.0, split=None, fitted_on=0, fitted_all_right=False)
    logits, labels = fit_on
    return measured(
        test,
        fit_temperature(logits, labels),
        split=CALIBRATION_SPLIT,
        fitted_on=len(labels),
        fitted_all_right=bool((logits.argmax(axis=1) == labels).all()),
    )


def measured(
    test: LabelledLogits, temperature: float, *, split: str | None, fitted_on: int, fitted_all_right: bool
) -> Calibration:
    """A temperature fitted elsewhere (on `fitted_on` images of `split`; None: none fitted, T = 1), measured on
    `test` before and after: ECE, NLL and the reliability bins. Nothing is fitted on `test`."""
    logits, labels = test
    before, after = softmax(logits), softmax(logits, temperature)
    return Calibration(
        temperature=temperature,
        split=split,
        fitted_on=fitted_on,
        fitted_all_right=fitted_all_right,
        ece_before=expected_calibration_error(labels, before),
        ece_after=expected_calibration_error(labels, after),
        nll_before=nll(logits, labels),
        nll_after=nll(logits, labels, temperature),
        reliability_before=reliability(labels, before),
        reliability_after=reliability(labels, after),
    )
