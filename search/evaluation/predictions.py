"""The final run's per-image test predictions: one writer (the retrain), one reader (compare.py).

A CSV a person can open: one row per test image with its key (path within the data
source), its true class, the predicted class and a probability per class. compare.py
pairs models image by image from it (McNemar's test, paired bootstrap), so it holds
every test image, in the split's order.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass

import numpy as np

PREDICTIONS_FILE = "test_predictions.csv"
FIXED_COLUMNS = ("image", "label", "prediction")
PROBABILITY_PREFIX = "p:"
"""Probability columns are 'p:<class name>', in the model's output order."""


@dataclass(frozen=True)
class Predictions:
    """One model's predictions on the test split."""

    keys: list[str]
    """The test images (paths relative to the data source), in row order."""
    labels: np.ndarray
    """(N,) true class indices."""
    probabilities: np.ndarray
    """(N, C) class probabilities."""
    classes: list[str]

    @property
    def predicted(self) -> np.ndarray:
        return self.probabilities.argmax(axis=1)

    @property
    def correct(self) -> np.ndarray:
        return self.predicted == self.labels


def predictions_csv(predictions: Predictions) -> str:
    """The CSV text; probabilities with 8 significant digits (ranks for ROC-AUC survive the round trip)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    classes = predictions.classes
    writer.writerow([*FIXED_COLUMNS, *(PROBABILITY_PREFIX + name for name in classes)])
    for key, label, row in zip(predictions.keys, predictions.labels, predictions.probabilities, strict=True):
        writer.writerow([key, classes[label], classes[int(row.argmax())], *(f"{p:.8g}" for p in row)])
    return out.getvalue()


def read_predictions(text: str, source: str) -> Predictions:
    """The CSV predictions_csv wrote; a ValueError names the source when it is not that."""
    rows = list(csv.reader(io.StringIO(text)))
    header = rows[0] if rows else []
    classes = [name.removeprefix(PROBABILITY_PREFIX) for name in header[len(FIXED_COLUMNS) :]]
    if tuple(header[: len(FIXED_COLUMNS)]) != FIXED_COLUMNS or len(classes) < 2:
        raise ValueError(f"{source} is not a {PREDICTIONS_FILE} (columns {', '.join(FIXED_COLUMNS)}, p:<class>...)")
    body = rows[1:]
    try:
        labels = np.array([classes.index(row[1]) for row in body], dtype=np.int64)
        probabilities = np.array([[float(p) for p in row[len(FIXED_COLUMNS) :]] for row in body], dtype=np.float64)
    except (ValueError, IndexError):
        raise ValueError(f"{source} has a row with an unknown class or a missing probability") from None
    return Predictions([row[0] for row in body], labels, probabilities.reshape(len(body), len(classes)), classes)
