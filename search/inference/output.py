"""What a prediction run writes: the CSV, the list of skipped files, the overlays' folder, all beside --out.

The CSV has one row per image that decoded: `image` (its path relative to --images),
`prediction` (the most probable class), `probability` (its probability), then one
`p:<class>` column per class in the model's output order, as final.py's
test_predictions.csv names them. Probabilities have 6 significant digits. A model
whose file carries an operating point (final.py --operating-point) adds a last column,
`flagged`: 1 where the positive class's calibrated probability is at or above its
threshold, else 0.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np

from search.evaluation.operating_point import threshold_text
from search.evaluation.predictions import PROBABILITY_PREFIX

FIXED_COLUMNS = ("image", "prediction", "probability")
FLAG_COLUMN = "flagged"
DIGITS = 6


@dataclass(frozen=True)
class FlagRule:
    """final.py's operating point as predict.py applies it: flag an image when p(positive) >= threshold."""

    positive: str
    """The class flagged."""
    column: int
    """Its index in the model's output."""
    threshold: float
    target: str
    """What the threshold was chosen for on val: 'sensitivity' or 'specificity'."""
    target_value: float

    @classmethod
    def from_record(cls, record: dict, classes: Sequence[str]) -> FlagRule:
        """A model file's operating_point (trainables.checkpoint.ModelFile); a ValueError when it names no class
        of the model or misses a key."""
        positive = record["positive"]
        if positive not in classes:
            raise ValueError(f"its operating point flags {positive!r}, which is none of its classes")
        return cls(
            positive,
            list(classes).index(positive),
            float(record["threshold"]),
            record["target"],
            record["target_value"],
        )

    def flags(self, probabilities: np.ndarray) -> np.ndarray:
        """(N,) 1 where the positive class's probability is at or above the threshold, else 0."""
        return (probabilities[:, self.column] >= self.threshold).astype(np.int64)

    def rule(self) -> str:
        """'p(malignant) >= 0.3124'."""
        return f"p({self.positive}) >= {threshold_text(self.threshold)}"

    def describe(self) -> str:
        """'1 where p(malignant) >= 0.3124 (chosen on val for sensitivity 0.95)'."""
        return f"1 where {self.rule()} (chosen on val for {self.target} {self.target_value:g})"


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

    def __init__(self, stream: TextIO, classes: Sequence[str], flag: FlagRule | None = None):
        self.classes = list(classes)
        self.flag = flag
        self.writer = csv.writer(stream, lineterminator="\n")
        flag_column = [FLAG_COLUMN] if flag is not None else []
        self.writer.writerow([*FIXED_COLUMNS, *(PROBABILITY_PREFIX + name for name in self.classes), *flag_column])
        self.rows = 0
        self.flagged = 0
        """Rows flagged by the operating point so far (0 without one)."""

    def write(self, paths: Sequence[str], probabilities: np.ndarray) -> None:
        # Flagged from the same float64 probabilities the row shows, not from their 6-digit text.
        flags = self.flag.flags(probabilities) if self.flag is not None else None
        for i, (path, row) in enumerate(zip(paths, probabilities, strict=True)):
            best = int(row.argmax())
            flag_cell = [str(flags[i])] if flags is not None else []
            self.writer.writerow([path, self.classes[best], number(row[best]), *(number(p) for p in row), *flag_cell])
        self.rows += len(paths)
        self.flagged += int(flags.sum()) if flags is not None else 0


def number(value: float) -> str:
    return f"{value:.{DIGITS}g}"


def skipped_lines(failures: Sequence[tuple[str, str]]) -> str:
    """'path<TAB>error' per line (an error's own line breaks and tabs become spaces)."""
    return "".join(f"{path}\t{' '.join(error.split())}\n" for path, error in failures)
