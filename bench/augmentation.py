"""Augmentation on orientation-sensitive images: the retired aug_strength against the per-augmentation knobs.

    python bench/augmentation.py [--epochs 8] [--seeds 2]    # about 7 min on 2 CPU cores

Trains vit (random init, 32 px) with the project's engine on scikit-learn's digits (10 classes; a mirrored or
upside-down digit is another digit or none), the same configuration four ways that differ only in augmentation:

- none: every knob 0;
- retired aug_strength 0.5: what the single knob applied at 0.5 (both flips at p = 0.5, rotation 15°,
  jitter 0.2, noise 0.025), via trainables.config.from_aug_strength;
- defaults: the new knobs' defaults (hflip 0.5, vflip 0, the rest as at strength 0.5);
- defaults, hflip 0: what the modality table of docs/search-spaces.md says for digits and text.

The configuration's other hyperparameters are those of the best configuration in
bench/search_efficiency_curves_vit.csv (its best final-epoch val_acc at 32 px), so the baseline is a good one.
Printed: per variant the final and best val_acc, median over --seeds, and the ratio of final val_acc to "none".
"""

from __future__ import annotations

import argparse
import csv
import statistics
import tempfile
from pathlib import Path

from search_efficiency import (  # puts the project on sys.path
    FULL,
    IMG_SIZE,
    NOT_HYPERPARAMETERS,
    curves_csv,
    digits_splits,
    train_curve,
)

from trainables.config import AUGMENTS, DEFAULTS, from_aug_strength

VARIANTS = {
    "none": dict.fromkeys(AUGMENTS, 0.0),
    "retired aug_strength 0.5": from_aug_strength(0.5),
    "defaults": DEFAULTS.augmentation(),
    "defaults, hflip 0": {**DEFAULTS.augmentation(), "hflip": 0.0},
}


def best_recorded_config(path: Path) -> dict:
    """The recorded configuration with the best final-epoch val_acc, without its augmentation."""
    with path.open(newline="") as file:
        rows = list(csv.DictReader(file))
    last = max(int(row["epoch"]) for row in rows)
    finals = (row for row in rows if int(row["epoch"]) == last and row["curve"] == FULL)
    best = max(finals, key=lambda row: float(row["val_acc"]))
    config: dict = {}
    for key, text in best.items():
        if key not in NOT_HYPERPARAMETERS:
            config[key] = int(text) if key in ("batch_size", "vit_depth") else float(text)
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=2)
    args = parser.parse_args()
    base = best_recorded_config(curves_csv("vit"))
    print(f"configuration: {base}")
    results: dict[str, list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory() as workdir:
        train, val, num_classes = digits_splits(Path(workdir), {IMG_SIZE}, per_class=None)
        train_images, val_images = len(train[IMG_SIZE]), len(val[IMG_SIZE])
        print(f"digits at 32 px: {train_images} train, {val_images} val images, {num_classes} classes", flush=True)
        for name, knobs in VARIANTS.items():
            for seed in range(args.seeds):
                sizes = (IMG_SIZE,) * args.epochs
                rows = train_curve("vit", {**base, **knobs}, sizes, train, val, num_classes, seed)
                curve = [row["val_acc"] for row in rows]
                results.setdefault(name, []).append((curve[-1], max(curve)))
                print(f"{name:<26} seed {seed}: final {curve[-1]:.4f}  best {max(curve):.4f}", flush=True)
    baseline = statistics.median(final for final, _ in results["none"])
    print(f"\n{'augmentation':<26}{'final val_acc':>14}{'best val_acc':>14}{'vs none':>9}")
    for name, scores in results.items():
        final = statistics.median(score for score, _ in scores)
        best = statistics.median(score for _, score in scores)
        print(f"{name:<26}{final:>14.4f}{best:>14.4f}{final / baseline:>8.2f}x")


if __name__ == "__main__":
    main()
