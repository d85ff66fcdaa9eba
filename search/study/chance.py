"""Trials that never left chance: which ones, and the likely cause, said in the study's closing lines and note.

A trial whose score stays where guessing lands has learnt nothing, and a study that does
not say so leaves a new user reading 0.0909 as a result. On the README's first command
(a cnn from random weights, 32 px, 3 epochs) the trials at batch 32 stayed there: 264
training images make 9 steps an epoch, 27 in all, too few for EfficientNetV2 to leave
chance, where the trials at batch 16 took 51 and learnt. So the cause is looked for in
what the trials did differently: the optimizer steps they took, then their learning rate.

Pure: works on a StudySummary (search.study.report, which builds on this module and its `chance_level`), so it
is tested on studies built in memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from trainables.config import DEFAULTS, METRIC_MODES

if TYPE_CHECKING:  # the report builds on this module: its summaries are only read here
    from search.study.report import StudySummary, TrialSummary

STANDARD_ERRORS = 2.0
"""A score counts as above chance once it is this many standard errors of a blind guess's accuracy on the val
images above chance: on 88 images of 11 classes, 0.152 against a chance of 0.0909."""
LOSS_BELOW = 0.95
"""A val_loss leaves chance below this share of ln C, the loss of a uniform guess."""


def chance_level(metric: str, num_classes: int) -> float:
    """What guessing scores on `num_classes` classes, the floor a trial must clear to have learnt anything.

    - val_acc: a uniform guess is right 1/C of the time (so is always guessing one class, on balanced classes).
    - val_balanced_acc: 1/C for any guess that ignores the image, even a constant one: the mean of the
      per-class recalls, and a blind guess recalls each class as often as it names it (shares summing to 1).
    - val_macro_f1: 1/C under uniform random guessing on balanced classes (each class's precision and recall
      are 1/C); less on imbalanced classes, so 1/C is the bar to clear.
    - val_loss: ln(C), the cross-entropy of predicting the uniform distribution, whatever the true class.
    """
    if metric not in METRIC_MODES:
        raise ValueError(f"metric {metric!r}: choose one of {', '.join(METRIC_MODES)}")
    if num_classes < 2:
        raise ValueError(f"num_classes {num_classes}: a classifier needs at least 2")
    return math.log(num_classes) if metric == "val_loss" else 1.0 / num_classes


@dataclass(frozen=True)
class AtChance:
    """The trials that never left chance, and why that likely is."""

    trials: tuple[TrialSummary, ...]
    bar: float
    """The score none of them passed, in any epoch."""
    cause: str
    """The likely cause and what to change, one sentence."""

    def line(self, summary: StudySummary) -> str:
        """One line for the closing summary and the study's note."""
        names = ", ".join(trial.label for trial in self.trials)
        verb = "stayed above" if summary.mode == "min" else "stayed at or below"
        return (
            f"{names} never left chance ({summary.metric} {verb} {self.bar:.4f} in every epoch; chance "
            f"{summary.chance:.4f}): {self.cause}"
        )


def chance_bar(metric: str, num_classes: int, val_images: int) -> float:
    """The score a trial must pass to have left chance: chance plus STANDARD_ERRORS standard errors of a blind
    guess on `val_images` images (0: unknown, then chance itself); for val_loss, LOSS_BELOW of ln C."""
    chance = chance_level(metric, num_classes)
    if metric == "val_loss":
        return chance * LOSS_BELOW
    if val_images < 1:
        return chance
    return chance + STANDARD_ERRORS * math.sqrt(chance * (1 - chance) / val_images)


def left_chance(trial: TrialSummary, mode: str, bar: float) -> bool:
    best = trial.best(mode)
    return best is not None and (best[1] > bar if mode == "max" else best[1] < bar)


def at_chance(summary: StudySummary) -> AtChance | None:
    """The trials with results that never passed the chance bar, with the likely cause; None when every trial
    left chance."""
    bar = chance_bar(summary.metric, summary.num_classes, summary.val_images)
    scored = [trial for trial in summary.trials if trial.curve]
    stuck = [trial for trial in scored if not left_chance(trial, summary.mode, bar)]
    if not stuck:
        return None
    learnt = [trial for trial in scored if trial not in stuck]
    return AtChance(tuple(stuck), bar, likely_cause(summary, stuck, learnt))


def likely_cause(summary: StudySummary, stuck: list[TrialSummary], learnt: list[TrialSummary]) -> str:
    """What the stuck trials did differently from those that learnt: fewer optimizer steps, a higher or a lower
    learning rate; without a difference, the study's budget and the data."""
    scratch = " from random weights (--no-pretrained)" if not summary.pretrained else ""
    if not learnt:
        return (
            f"no trial learnt anything{scratch} in {summary.max_t} epoch(s): give more --epochs, search a lower "
            f"lr, and check that each class's images carry its label"
        )
    if summary.train_images:
        stuck_steps, learnt_steps = steps(stuck, summary.train_images), steps(learnt, summary.train_images)
        if max(stuck_steps) < min(learnt_steps):
            return (
                f"they took {span(stuck_steps)} optimizer steps, the trials that learnt {span(learnt_steps)}: too "
                f"few to leave chance{scratch}; give more --epochs, or smaller batch_size choices in the space"
            )
    stuck_lr, learnt_lr = learning_rates(stuck), learning_rates(learnt)
    if min(stuck_lr) > max(learnt_lr):
        return (
            f"their lr ({span(stuck_lr)}) was above that of every trial that learnt ({span(learnt_lr)}): lower "
            f"lr's high bound in the space"
        )
    if max(stuck_lr) < min(learnt_lr):
        return (
            f"their lr ({span(stuck_lr)}) was below that of every trial that learnt ({span(learnt_lr)}): raise "
            f"lr's low bound in the space, or give more --epochs"
        )
    return (
        f"neither their optimizer steps nor their lr set them apart from the trials that learnt; {summary.max_t} "
        f"epoch(s){scratch} may be too few for such configurations: give more --epochs"
    )


def steps(trials: list[TrialSummary], train_images: int) -> list[int]:
    """The optimizer steps each trial took: its epochs times the batches of the train split at its batch size."""
    return [trial.epochs * math.ceil(train_images / int(knob(trial, "batch_size"))) for trial in trials]


def learning_rates(trials: list[TrialSummary]) -> list[float]:
    return [float(knob(trial, "lr")) for trial in trials]


def knob(trial: TrialSummary, name: str) -> float:
    """A trial's value of a knob: sampled, or the default where the space did not search it."""
    return float(trial.params.get(name, getattr(DEFAULTS, name)))


def span(values: list[float] | list[int]) -> str:
    """'27' or '27 to 54'; learning rates to 3 significant digits."""
    low, high = min(values), max(values)
    shown = [f"{value:.3g}" if isinstance(value, float) else str(value) for value in (low, high)]
    return shown[0] if low == high else f"{shown[0]} to {shown[1]}"
