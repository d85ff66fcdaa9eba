"""The leakage check before any training: duplicate images across train, val and test, warned about or refused.

The hashing and comparing are trainables.leakage's (numpy); this module names what it found by
the images' keys, says it in one line, and applies --on-leak: 'warn' goes on, 'fail' stops the
study before its MLflow run opens or Ray starts.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from itertools import combinations

from search.errors import UsageError
from trainables.data import SPLITS, CachedSplit, DatasetIndex
from trainables.leakage import Duplicate, Fingerprints, cross_split_duplicates, split_fingerprints

SHOWN = 3
"""Example pairs a message names."""
SPLIT_PAIRS = tuple(combinations(SPLITS, 2))
"""(train, val), (train, test), (val, test)."""


@dataclass(frozen=True)
class LeakReport:
    """The duplicate pairs across splits, by key."""

    duplicates: tuple[Duplicate, ...]
    keys: dict[str, list[str]]
    """Each split's keys, in the order of its decoded cache (the duplicates' positions)."""

    def counts(self) -> dict[str, int]:
        """leak_exact_train_test and the like, zeros included: the study's metrics."""
        counts = {f"leak_{kind}_{a}_{b}": 0 for a, b in SPLIT_PAIRS for kind in ("exact", "near")}
        for duplicate in self.duplicates:
            counts[f"leak_{duplicate.kind}_{duplicate.first_split}_{duplicate.second_split}"] += 1
        return counts

    def breakdown(self) -> str:
        """'train-test: 2 exact, 1 near; val-test: 1 exact'."""
        counts = self.counts()
        parts = []
        for a, b in SPLIT_PAIRS:
            found = [f"{counts[f'leak_{kind}_{a}_{b}']} {kind}" for kind in ("exact", "near")]
            found = [text for text in found if not text.startswith("0 ")]
            if found:
                parts.append(f"{a}-{b}: {', '.join(found)}")
        return "; ".join(parts)

    def pair(self, duplicate: Duplicate) -> tuple[str, str]:
        return self.keys[duplicate.first_split][duplicate.first], self.keys[duplicate.second_split][duplicate.second]

    def examples(self) -> str:
        """'train:a.png = test:b.png, val:c.png ~ test:d.png' (= exact, ~ near), the first few."""
        shown = []
        for duplicate in self.duplicates[:SHOWN]:
            first, second = self.pair(duplicate)
            sign = "=" if duplicate.exact else "~"
            shown.append(f"{duplicate.first_split}:{first} {sign} {duplicate.second_split}:{second}")
        return ", ".join(shown) + (", ..." if len(self.duplicates) > SHOWN else "")

    def describe(self) -> str:
        return (
            f"{len(self.duplicates)} pair(s) of duplicate images across splits ({self.breakdown()}), "
            f"e.g. {self.examples()}"
        )

    def table(self) -> str:
        """leakage.csv: every pair found, exact ones first."""
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["kind", "distance_bits", "first_split", "first_key", "second_split", "second_key"])
        for duplicate in self.duplicates:
            first, second = self.pair(duplicate)
            writer.writerow(
                [duplicate.kind, duplicate.distance, duplicate.first_split, first, duplicate.second_split, second]
            )
        return out.getvalue()


def check_leaks(
    index: DatasetIndex, cached: dict[str, CachedSplit], size: int, cache_dir: str, on_leak: str
) -> LeakReport:
    """Fingerprint every split (train and val from their decoded cache, test decoded for this alone: see
    split_fingerprints), compare them pairwise, and warn (on_leak 'warn') or refuse ('fail', a UsageError) where
    images repeat."""
    prints: dict[str, Fingerprints] = {}
    keys: dict[str, list[str]] = {}
    undecoded = 0
    for split in SPLITS:
        split_prints, decoded = split_fingerprints(index, split, size, cache_dir, cached.get(split))
        prints[split] = split_prints[decoded]
        keys[split] = [sample.key for sample, ok in zip(index.splits[split], decoded, strict=True) if ok]
        undecoded += int((~decoded).sum())
    report = LeakReport(tuple(cross_split_duplicates(prints)), keys)
    if undecoded:
        print(f"note: {undecoded} test image(s) would not decode; the leakage check leaves them out", flush=True)
    if not report.duplicates:
        print("Leakage check: no exact or near-duplicate images across train, val and test")
    elif on_leak == "fail":
        raise UsageError(
            f"{report.describe()}: the test scores would be inflated; remove the copies or keep each in one split "
            f"(one patient group in a manifest), or pass --on-leak warn to go on"
        )
    else:
        print(
            f"warning: {report.describe()}: the test scores may be inflated; remove the copies or keep each in one "
            f"split (--on-leak fail refuses such data)",
            flush=True,
        )
    return report
