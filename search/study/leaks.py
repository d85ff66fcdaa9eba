"""The leakage check before any training: duplicate images across train, val and test, warned about or refused.

The hashing and comparing are trainables.leakage's (numpy); this module names what it found by
the images' keys, says it in one line, and applies --on-leak: 'warn' goes on, 'fail' stops the
study before its MLflow run opens or Ray starts. Mirrored copies are looked for under the flips
the study's space lets training make (`training_flips`).
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from itertools import combinations

from search.errors import UsageError
from search.study.spaces import Space
from trainables.data import SPLITS, CachedSplit, DatasetIndex
from trainables.leakage import Duplicate, Fingerprints, cross_split_duplicates, split_fingerprints

SHOWN = 3
"""Example pairs a message names."""
SPLIT_PAIRS = tuple(combinations(SPLITS, 2))
"""(train, val), (train, test), (val, test)."""
KINDS = ("exact", "near", "mirror")
"""The kinds of duplicate (Duplicate.kind), in the order the counts name them."""


@dataclass(frozen=True)
class LeakReport:
    """The duplicate pairs across splits, by key."""

    duplicates: tuple[Duplicate, ...]
    keys: dict[str, list[str]]
    """Each split's keys, in the order of its decoded cache (the duplicates' positions)."""

    def counts(self) -> dict[str, int]:
        """leak_exact_train_test, leak_mirror_val_test and the like, zeros included: the study's metrics."""
        counts = {f"leak_{kind}_{a}_{b}": 0 for a, b in SPLIT_PAIRS for kind in KINDS}
        for duplicate in self.duplicates:
            counts[f"leak_{duplicate.kind}_{duplicate.first_split}_{duplicate.second_split}"] += 1
        return counts

    def breakdown(self) -> str:
        """'train-test: 2 exact, 1 near, 1 mirror; val-test: 1 exact'."""
        counts = self.counts()
        parts = []
        for a, b in SPLIT_PAIRS:
            found = [f"{counts[f'leak_{kind}_{a}_{b}']} {kind}" for kind in KINDS]
            found = [text for text in found if not text.startswith("0 ")]
            if found:
                parts.append(f"{a}-{b}: {', '.join(found)}")
        return "; ".join(parts)

    def pair(self, duplicate: Duplicate) -> tuple[str, str]:
        return self.keys[duplicate.first_split][duplicate.first], self.keys[duplicate.second_split][duplicate.second]

    def examples(self) -> str:
        """'train:a.png = test:b.png, val:c.png ~ test:d.png, train:e.png ~ test:f.png (hflip)' (= exact, ~ near,
        a flip named for a mirrored copy), the first few."""
        shown = []
        for duplicate in self.duplicates[:SHOWN]:
            first, second = self.pair(duplicate)
            sign = "=" if duplicate.exact else "~"
            flip = f" ({duplicate.flip})" if duplicate.flip else ""
            shown.append(f"{duplicate.first_split}:{first} {sign} {duplicate.second_split}:{second}{flip}")
        return ", ".join(shown) + (", ..." if len(self.duplicates) > SHOWN else "")

    def describe(self) -> str:
        return (
            f"{len(self.duplicates)} pair(s) of duplicate images across splits ({self.breakdown()}), "
            f"e.g. {self.examples()}"
        )

    def table(self) -> str:
        """leakage.csv: every pair found, exact ones first; `flip` names the flip of a mirrored copy."""
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["kind", "distance_bits", "first_split", "first_key", "second_split", "second_key", "flip"])
        for duplicate in self.duplicates:
            first, second = self.pair(duplicate)
            writer.writerow(
                [
                    duplicate.kind,
                    duplicate.distance,
                    duplicate.first_split,
                    first,
                    duplicate.second_split,
                    second,
                    duplicate.flip,
                ]
            )
        return out.getvalue()


def training_flips(space: Space) -> tuple[str, ...]:
    """The flips training can make under this space (keys of trainables.leakage.FLIPS): hflip and vflip where the
    space can draw them above 0, and both at once where it can draw both."""
    knobs = tuple(knob for knob in ("hflip", "vflip") if space.largest(knob) > 0)
    return knobs + (("hflip+vflip",) if len(knobs) == 2 else ())


def check_leaks(
    index: DatasetIndex,
    cached: dict[str, CachedSplit],
    size: int,
    cache_dir: str,
    on_leak: str,
    flips: tuple[str, ...] = (),
) -> LeakReport:
    """Fingerprint every split (train and val from their decoded cache, test decoded for this alone: see
    split_fingerprints), compare them pairwise, mirrored copies under `flips` included (training_flips), and warn
    (on_leak 'warn') or refuse ('fail', a UsageError) where images repeat."""
    prints: dict[str, Fingerprints] = {}
    keys: dict[str, list[str]] = {}
    undecoded = 0
    for split in SPLITS:
        split_prints, decoded = split_fingerprints(index, split, size, cache_dir, cached.get(split))
        prints[split] = split_prints[decoded]
        keys[split] = [sample.key for sample, ok in zip(index.splits[split], decoded, strict=True) if ok]
        undecoded += int((~decoded).sum())
    report = LeakReport(tuple(cross_split_duplicates(prints, flips=flips)), keys)
    if undecoded:
        print(f"note: {undecoded} test image(s) would not decode; the leakage check leaves them out", flush=True)
    if not report.duplicates:
        mirrored = f", nor copies mirrored as training flips them ({', '.join(flips)})" if flips else ""
        print(f"Leakage check: no exact or near-duplicate images across train, val and test{mirrored}")
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
