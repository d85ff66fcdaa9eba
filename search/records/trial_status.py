"""How a search trial stands: the one vocabulary of the `trial_status` tag on its MLflow child run.

The strings are the record's, read back by the study's report, final.py and compare.py: a member is
its string (a str subclass), so it is written, compared and counted as the plain word.
"""

from __future__ import annotations

from enum import Enum


class TrialStatus(str, Enum):
    """A trial's `trial_status` tag, in the order a study's report counts them."""

    COMPLETED = "completed"
    """Trained to its epoch budget, or stopped itself early: its best score is final."""
    PRUNED = "pruned"
    """Stopped by ASHA at a rung: its score is an early one."""
    FAILED = "failed"
    """Crashed (after --max-failures retries): its child run is FAILED, with a `failure` tag."""
    INTERRUPTED = "interrupted"
    """Training when the study was stopped (Ctrl-C, a lost cluster): --resume continues it."""
    LOST = "lost"
    """Started after Ray's last snapshot, so unknown to the resumed study, which draws it again: its old run is
    kept for the epochs it logged, and never wins."""
    RUNNING = "running"
    """Training now (or its process was killed before it could say otherwise)."""

    # MLflow tags, run names and f-strings show the word, never TrialStatus.COMPLETED (Python's own choice changed
    # between versions for str-mixed enums).
    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)
