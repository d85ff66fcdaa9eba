"""Whether a study's training split is imbalanced enough to say so before the trials start, and the line that says it.

With one class many times another, a classifier scores a high val_acc by favouring the large class; balanced
accuracy (the mean of the per-class recalls) does not reward that, and class weighting in the loss counters it.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

from trainables.config import CLASS_WEIGHTINGS
from trainables.data import DatasetIndex

if TYPE_CHECKING:
    from search.study.preflight import CheckedStudy

IMBALANCE_WARNING_RATIO = 5.0
"""Largest class count over the smallest, in the train split, above which run.py warns: beyond 5:1 a model that
always answers the large class already scores over 83 % accuracy between those two."""
BALANCED_METRIC = "val_balanced_acc"
CLASS_WEIGHTING = "class_weighting"


def imbalance_warning(index: DatasetIndex, metric: str, searched: list[str]) -> str | None:
    """The one-line warning for a train split whose largest class outnumbers its smallest more than
    IMBALANCE_WARNING_RATIO to 1, or None. It suggests --metric val_balanced_acc unless that is `metric`, and says
    whether the space searches class_weighting (`searched`: the space's searched knobs) or should."""
    counts = Counter(sample.label for sample in index.splits["train"])
    per_class = {name: counts.get(label, 0) for label, name in enumerate(index.classes)}
    largest = max(per_class, key=per_class.__getitem__)
    smallest = min(per_class, key=per_class.__getitem__)
    if per_class[largest] <= IMBALANCE_WARNING_RATIO * per_class[smallest]:
        return None
    ratio = f"{per_class[largest] / per_class[smallest]:.1f}:1" if per_class[smallest] else f"{per_class[largest]}:0"
    advice = [] if metric == BALANCED_METRIC else [f"consider --metric {BALANCED_METRIC}, which weighs classes alike"]
    if CLASS_WEIGHTING in searched:
        advice.append(f"the space searches {CLASS_WEIGHTING} ({', '.join(CLASS_WEIGHTINGS)})")
    else:
        advice.append(f"add {CLASS_WEIGHTING} to the space to search weighted losses")
    return (
        f"warning: the train split is imbalanced {ratio} (class {largest!r}: {per_class[largest]} images, "
        f"class {smallest!r}: {per_class[smallest]}); {'; '.join(advice)}"
    )


def warn_if_imbalanced(checked: CheckedStudy, metric: str) -> None:
    """Print imbalance_warning's line for the study's split and space, if it has one."""
    warning = imbalance_warning(checked.index, metric, checked.space.searched)
    if warning is not None:
        print(warning, flush=True)
