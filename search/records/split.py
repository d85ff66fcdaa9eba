"""The split spec: what decides a study's train/val/test split, so that a retrain tests on the same images."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SplitSpec:
    """The data, the seed that cut it, and whether the --smoke subsample was taken. A study's split.json records
    the images themselves; this is what cuts them again for a study that has none."""

    data: str
    """The data source ('synthetic[:C]' or an absolute folder)."""
    seed: int
    """The study's seed: it decides the train/val/test split (and the smoke subsample)."""
    smoke: bool = False
    """A --smoke study: the same per-class subsample is applied, so the split is identical."""
