"""What final.py --operating-point asks for: a sensitivity or a specificity to reach on the val split.

`sensitivity=0.95` asks for the highest threshold on the --positive class's calibrated
probability that still flags at least 95 % of val's positive images; `specificity=0.9`
for the lowest that leaves at least 90 % of its other images unflagged. The threshold
itself is chosen after training (search.evaluation.operating_point); this record is the
request, read from the command line before anything loads. Standard library only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

TARGETS = ("sensitivity", "specificity")
"""What an operating point may be asked to reach on val."""
EXAMPLE = "sensitivity=0.95"


@dataclass(frozen=True)
class OperatingTarget:
    """A rate to reach on the val split: --operating-point TARGET=VALUE."""

    target: str
    """'sensitivity' or 'specificity' (TARGETS)."""
    value: float
    """Strictly between 0 and 1."""

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise ValueError(f"{self.target}: not one of {', '.join(TARGETS)}")
        if not (math.isfinite(self.value) and 0 < self.value < 1):
            raise ValueError(f"{self.target}={self.value}: the value must lie strictly between 0 and 1")

    def __str__(self) -> str:
        """'sensitivity=0.95', as the flag is written."""
        return f"{self.target}={self.value:g}"


def parse_operating_point(text: str) -> OperatingTarget:
    """--operating-point TARGET=VALUE as a record; a ValueError (one line, naming the flag) when it is not one."""
    name, equals, number = text.partition("=")
    name = name.strip().lower()
    if not equals or name not in TARGETS:
        raise ValueError(
            f"--operating-point {text}: write {' or '.join(f'{target}=VALUE' for target in TARGETS)}, e.g. {EXAMPLE}"
        )
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"--operating-point {text}: {number.strip() or 'the value'} is not a number") from None
    if not (math.isfinite(value) and 0 < value < 1):
        raise ValueError(
            f"--operating-point {text}: the {name} must lie strictly between 0 and 1 (a share of images), "
            f"e.g. {EXAMPLE}"
        )
    return OperatingTarget(name, value)
