"""Test-split arrays with known properties, for the evaluation's and the comparison's statistics."""

from __future__ import annotations

import numpy as np

from search.evaluation.calibration import softmax
from search.evaluation.predictions import Predictions


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


def scaled_logits(images: int, temperature: float, seed: int, classes: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Logits `temperature` times too sharp, and labels drawn from the calibrated probabilities."""
    rng = np.random.default_rng(seed)
    true_logits = rng.normal(scale=2.0, size=(images, classes))
    probabilities = softmax(true_logits)
    labels = (probabilities.cumsum(axis=1) > rng.random((images, 1))).argmax(axis=1)
    return (temperature * true_logits).astype(np.float32), labels
