"""What a prediction run writes: the CSV, the list of skipped files, the overlays' folder, all beside --out.

The CSV has one row per image that decoded: `image` (its path relative to --images),
`prediction` (the most probable class), `probability` (its probability), then one
`p:<class>` column per class in the model's output order, as final.py's
test_predictions.csv names them. Probabilities have 6 significant digits.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

import numpy as np

from search.evaluation.predictions import PROBABILITY_PREFIX

FIXED_COLUMNS = ("image", "prediction", "probability")
DIGITS = 6


def skipped_file(out: Path) -> Path:
    """predictions.csv → predictions_skipped.txt: the files that did not decode, with why."""
    return out.with_name(f"{out.stem}_skipped.txt")


def saliency_folder(out: Path) -> Path:
    """predictions.csv → predictions_saliency/: the --explain overlays, laid out like --images."""
    return out.with_name(f"{out.stem}_saliency")


def partial_file(out: Path) -> Path:
    """Where the CSV grows until the run ends: a CSV at --out is always a whole one."""
    return out.with_name(f"{out.name}.partial")


class PredictionWriter:
    """Rows appended batch by batch."""

    def __init__(self, stream: TextIO, classes: Sequence[str]):
        self.classes = list(classes)
        self.writer = csv.writer(stream, lineterminator="\n")
        self.writer.writerow([*FIXED_COLUMNS, *(PROBABILITY_PREFIX + name for name in self.classes)])
        self.rows = 0

    def write(self, paths: Sequence[str], probabilities: np.ndarray) -> None:
        for path, row in zip(paths, probabilities, strict=True):
            best = int(row.argmax())
            self.writer.writerow([path, self.classes[best], number(row[best]), *(number(p) for p in row)])
        self.rows += len(paths)


def number(value: float) -> str:
    return f"{value:.{DIGITS}g}"


def skipped_lines(failures: Sequence[tuple[str, str]]) -> str:
    """'path<TAB>error' per line (an error's own line breaks and tabs become spaces)."""
    return "".join(f"{path}\t{' '.join(error.split())}\n" for path, error in failures)
