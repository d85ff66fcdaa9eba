"""A winner's record for tests that need one (the study's note, its closing lines, naming its run)."""

from __future__ import annotations

from dataclasses import replace

from search.records.split import SplitSpec
from search.records.winner import Winner
from trainables.config import Hyperparameters


def a_winner(**changes) -> Winner:
    """A cnn winner of two classes on synthetic data, with `changes` (trial, trial_id, best_value, ...)."""
    winner = Winner(
        model="cnn",
        hyperparameters=Hyperparameters(),
        classes=["a", "b"],
        split=SplitSpec("synthetic", 0),
        img_size=32,
        metric="val_acc",
    )
    return replace(winner, **changes)
