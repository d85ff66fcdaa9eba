"""One "best score so far": the engine, the searcher, the MLflow record and the console all keep it through
trainables.config (improves, keep_best), so a NaN or a tie means the same to each."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from trainables.config import Hyperparameters, improves, keep_best
from trainables.engine import Learner


@pytest.mark.parametrize(
    "mode, scores, improved, best",
    [
        ("max", [0.5, math.nan, 0.7, 0.6, 0.7], [True, False, True, False, False], 0.7),
        ("min", [0.5, 0.4, None, 0.45], [True, True, False, False], 0.4),
        ("max", [math.nan, 0.2], [False, True], 0.2),  # a NaN first epoch holds no place
    ],
)
def test_keep_best_keeps_each_keys_best_and_says_when_it_improved(mode, scores, improved, best):
    bests: dict[str, float] = {"other": 9.0}
    assert [keep_best(bests, "t00", score, mode) for score in scores] == improved
    assert bests == {"other": 9.0, "t00": best}


def test_a_tie_or_a_nan_never_improves_and_a_nan_best_is_no_best():
    assert not improves("max", 0.7, 0.7) and not improves("min", math.nan, 0.3)
    assert improves("max", 0.1, math.nan)  # an older checkpoint's NaN best gives way to a real score


def test_the_engine_s_best_epoch_is_the_first_real_score_after_a_nan_one():
    learner = Learner(nn.Linear(2, 2), Hyperparameters(), torch.device("cpu"), "val_acc")
    assert not learner.end_epoch({"val_acc": math.nan})
    assert learner.end_epoch({"val_acc": 0.4})  # before: a NaN first epoch stayed "best" for good
    assert not learner.end_epoch({"val_acc": 0.4})
    assert (learner.best_score, learner.bad_epochs) == (0.4, 1)
