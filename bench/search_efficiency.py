"""Search efficiency: the compute each searcher + scheduler spends before it finds a near-best configuration.

    python bench/search_efficiency.py record --model cnn [--configs 60] [--epochs 8]   # resumable; hours on a CPU
    python bench/search_efficiency.py record --model vit [--configs 60] [--epochs 8]
    python bench/search_efficiency.py replay [--seeds 50] [--trials 30]               # minutes, deterministic

record: a task where configurations spread. scikit-learn's digits (1,797 8x8 grey digits, 10 classes) written as
PNG class folders, indexed and split 70/15/15 by the project's data code (stratified, seed 0), then only PER_CLASS
training images a class kept (seeded) and the whole validation split (269 images: one image is 0.37 points), decoded
to RGB at 32 px and at each smaller size of the resolution schedule. Configuration 0 is the recipe (what run.py's
recipe trial gets: the knobs' defaults clipped into spaces/<model>.yaml); then --configs drawn by Optuna's
RandomSampler (seeded) through the project's own `Space.sample`, stored as the hyperparameters a trial gets. Each is
trained with the engine's Learner (random init, one torch thread, one training seed for all, no early stopping) for
two curves of --epochs: every epoch at 32 px, and run.py's --fidelity resolution schedule (trainables.fidelity:
smaller images up to ASHA's rungs, each epoch trained and validated at its size). One row per curve and epoch
(val_acc, val_loss, seconds, the epoch's image size and its compute in full-resolution epochs) goes to
bench/search_efficiency_curves_<model>.csv; a stopped recording continues where it stopped, configuration by
configuration, so any prefix is a whole table.

replay: no Ray Tune run and no clock. Each study is a discrete-event simulation of a study with two trials at once
(one GPU, two slots): the project's PruneAwareOptunaSearch (Optuna's RandomSampler, or tuning.tpe_sampler untuned
or tuned) proposes through its Ray Searcher interface, run.py's RecipeKeepingASHA (grace period 2, reduction factor
3, max_t the table's epochs, time_attr epoch) or no scheduler decides, and a proposal is replaced by the nearest
recorded configuration, whose curve is replayed epoch by epoch, each epoch lasting its compute; results reach the
scheduler and the searcher in time order, as Tune's controller hands them on. The same seeds for every arm.

Arms (ARMS): random search without and with ASHA; today's run.py (Optuna's default TPE + ASHA over the space as it
was before issue 25, no recipe); untuned and tuned TPE + ASHA over spaces/<model>.yaml, without and with the recipe
queued first; and those recipe arms on the resolution curves.

Measured per study: the compute (full-resolution epochs, every trial's, summed in time order) until the best
val_acc so far is within WITHIN (1 point) of the target, the best final-epoch val_acc of the table at 32 px (a study
that never gets there counts as infinite); the best val_acc after the trials; the total compute; whether it ended
below the recipe trained once. Only 32 px epochs count as results: a 16 px val_acc is no 32 px model. Per arm:
medians with 95 % bootstrap intervals over the seeds (10,000 resamples, seeded), the ratio of medians to random
search's and the paired (same seed) differences against it, with intervals. Written to bench/search_efficiency.md
and bench/search_efficiency.png (best so far against compute, median over seeds, per model).

Nearest configuration: each searched hyperparameter scaled to [0, 1] over the union of its ranges in the old and
new spaces (log ones on a log scale), a categorical mismatch counting 1; Euclidean over them. A knob a proposal
leaves out is at its default.
"""

from __future__ import annotations

import argparse
import csv
import functools
import math
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: the project's packages import

from search.study.spaces import Parameter, Space, load_space, parse_document  # noqa: E402
from trainables.config import DEFAULTS  # noqa: E402

MODELS = ("cnn", "vit")
IMG_SIZE = 32
PER_CLASS = 15
"""Training images per class: few, so that regularisation and augmentation decide and configurations spread."""
SPLIT_SEED = 0
TRAIN_SEED = 0
"""One training seed for every configuration, as one study seeds every trial alike: configs compare fairly."""
GRACE_PERIOD, REDUCTION_FACTOR = 2, 3
"""run.py's ASHA defaults (StudyConfig's): the resolution schedule is cut at its rungs, and the replay uses them."""
FULL, RESOLUTION = "full", "resolution"
CURVES = (FULL, RESOLUTION)
"""The two curves of every configuration: every epoch at IMG_SIZE; the resolution schedule's sizes."""
WITHIN = 0.01
"""'Within 1 point': the best val_acc found >= the target - WITHIN."""
TOP_SHARE = 0.05
"""A second, looser level reported beside: the final val_acc that the table's best 5 % of configurations reach.
Where one configuration alone ends within 1 point of the best, reaching the target is finding that one."""
BENCH = ROOT / "bench"


def curves_csv(model: str, img_size: int = IMG_SIZE) -> Path:
    """The model's curve table: at IMG_SIZE the benchmark's own; at another --img-size a table beside it."""
    suffix = "" if img_size == IMG_SIZE else f"_{img_size}px"
    return BENCH / f"search_efficiency_curves_{model}{suffix}.csv"


# ---------------------------------------------------------------- record: the data


def write_digits_folder(root: Path) -> Path:
    """scikit-learn's digits as root/digit_<d>/<n>.png (8x8 grey, 0..16 scaled to 0..255): a class-folder source."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for number, (image, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        folder = root / f"digit_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((image * 255 / 16).round().astype(np.uint8)).save(folder / f"{number:04d}.png")
    return root


def digits_splits(workdir: Path, sizes: set[int], per_class: int | None = PER_CLASS) -> tuple[dict, dict, int]:
    """Train (per_class images a class, seeded; None: all) and the whole val split of the digits, as the project
    caches any class folder: split by seed, decoded once per size into RGB. ({size: train}, {size: val}, classes)."""
    from trainables.data import cache_split, index_source, subsample

    index = index_source(write_digits_folder(workdir / "digits"), SPLIT_SEED)
    if per_class is not None:
        index = subsample(index, {"train": per_class}, SPLIT_SEED)
    cache = workdir / "cache"
    train = {size: cache_split(index, "train", size, cache) for size in sorted(sizes)}
    val = {size: cache_split(index, "val", size, cache) for size in sorted(sizes)}
    return train, val, len(index.classes)


def epoch_sizes(curve: str, epochs: int, img_size: int) -> tuple[int, ...]:
    """Each epoch's image size: img_size throughout, or the resolution schedule run.py's --fidelity resolution uses."""
    from trainables.fidelity import resolution_schedule

    if curve == FULL:
        return (img_size,) * epochs
    return resolution_schedule(img_size, epochs, GRACE_PERIOD, REDUCTION_FACTOR)


# ---------------------------------------------------------------- record: configurations and curves


def configuration(space: Space, trial) -> dict:
    """What a trial of the space gets from an Optuna trial: its hyperparameters (no switches) and the constants
    (the fixed values, and the `or` value of a knob switched off)."""
    constants = space.sample(trial)
    values = {**space.hyperparameters(trial.params), **constants}
    return {parameter.name: values[parameter.name] for parameter in space.parameters}  # the table's column order


def draw_configs(space: Space, count: int, seed: int) -> list[dict]:
    """Configuration 0 is the recipe (what run.py's recipe trial gets); then `count` drawn by Optuna's
    RandomSampler through the space's own sampler."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    configs = [configuration(space, optuna.trial.FixedTrial(space.recipe()))]
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=seed))
    configs += [configuration(space, study.ask()) for _ in range(count)]
    return configs


def train_curve(
    model: str, config: dict, sizes: tuple[int, ...], train: dict, val: dict, num_classes: int, seed: int = TRAIN_SEED
):
    """Yield one row per epoch: trained and validated at that epoch's size (every trial alike), no early stopping.
    Learner's own epoch (train_epoch, evaluate, end_epoch), as fit runs it, with the split of the epoch's size."""
    import torch

    from trainables.config import Hyperparameters
    from trainables.engine import Learner, NonFiniteLoss
    from trainables.models import build_model
    from trainables.spec import ModelSpec

    hp = Hyperparameters.from_dict(config)
    torch.manual_seed(seed)  # the same initial weights for every configuration, as in train_trial
    img_size = max(sizes)  # the last epoch is at the study's size
    spec = ModelSpec(model, num_classes, img_size, pretrained=False).with_knobs(hp)
    network = build_model(spec, dynamic_size=min(sizes) < img_size)
    learner = Learner(network, hp, torch.device("cpu"), "val_acc", seed)
    for epoch, size in enumerate(sizes, start=1):
        started = time.perf_counter()
        try:
            train_loss = learner.train_epoch(train[size])
        except NonFiniteLoss:
            # A diverged configuration: its remaining epochs are NaN, and its replayed trial fails as a real one.
            for rest in range(epoch, len(sizes) + 1):
                yield epoch_row(rest, sizes[rest - 1], img_size, math.nan, math.nan, math.nan, 0.0, train)
            return
        metrics = learner.evaluate(val[size])
        learner.end_epoch(metrics)
        seconds = time.perf_counter() - started
        yield epoch_row(epoch, size, img_size, metrics["val_acc"], metrics["val_loss"], train_loss, seconds, train)


def epoch_row(
    epoch: int, size: int, img_size: int, val_acc: float, val_loss: float, train_loss: float, seconds: float, train
):
    """One table row; compute in full-resolution epochs (every epoch trains on the whole training split)."""
    from trainables.fidelity import epoch_compute

    images = len(train[size])
    return {
        "epoch": epoch,
        "img_size": size,
        "compute": epoch_compute(images, images, size, img_size),
        "val_acc": val_acc,
        "val_loss": val_loss,
        "train_loss": train_loss,
        "seconds": seconds,
    }


def recorded(path: Path, drawn: list[dict]) -> set[tuple[str, int]]:
    """(curve, configuration) pairs the table holds already (an interrupted recording continues), checked
    against this draw."""
    if not path.exists():
        return set()
    with path.open(newline="") as file:
        rows = list(csv.DictReader(file))
    for row in rows:
        number = int(row["config"])  # one beyond --configs is a longer recording's: kept, not checked
        if number < len(drawn) and any(str(value) != row[name] for name, value in drawn[number].items()):
            raise SystemExit(f"{path} holds other configurations than this draw: remove it, or record with its --seed")
    return {(row["curve"], int(row["config"])) for row in rows}


def append_rows(path: Path, rows: list[dict]) -> None:
    new = not path.exists()
    with path.open("a", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        if new:
            writer.writeheader()
        writer.writerows(rows)


def record(model: str, configs: int, epochs: int, seed: int, img_size: int, out: Path, first: int = 0) -> None:
    """Both curves of every configuration, configuration by configuration (a table cut short holds whole pairs),
    whole curves only."""
    import torch

    torch.set_num_threads(1)  # a shared machine: one core for each model's recording
    space = load_space(ROOT / "spaces" / f"{model}.yaml", model)
    drawn = draw_configs(space, configs, seed)
    done = recorded(out, drawn)
    started = time.time()
    sizes = {curve: epoch_sizes(curve, epochs, img_size) for curve in CURVES}
    with tempfile.TemporaryDirectory(prefix="bench-search-efficiency-") as workdir:
        train, val, num_classes = digits_splits(Path(workdir), {s for each in sizes.values() for s in each})
        print(f"{model}: digits, {len(train[img_size])} train and {len(val[img_size])} val images", flush=True)
        for number, config in enumerate(drawn):
            for curve in CURVES:
                if (curve, number) in done or number < first:
                    continue
                rows = []
                for row in train_curve(model, config, sizes[curve], train, val, num_classes):
                    rows.append({"curve": curve, "config": number, **config, **row})
                    print(
                        f"{model} {curve} config {number:2d} epoch {row['epoch']} at {row['img_size']} px  "
                        f"val_acc {row['val_acc']:.4f}  ({row['seconds']:.1f} s)",
                        flush=True,
                    )
                append_rows(out, rows)  # whole curves only: a stopped recording redoes at most one curve
    print(f"{model}: recorded in {time.time() - started:.0f} s", flush=True)


# ---------------------------------------------------------------- replay: the table


@dataclass(frozen=True)
class Curves:
    """One kind of curve of every recorded configuration: arrays of (configurations, epochs)."""

    val_acc: np.ndarray
    compute: np.ndarray
    """Each epoch's compute in full-resolution epochs: 1 at the table's size, (size / its size)**2 below it."""
    sizes: np.ndarray
    """Each epoch's image size."""

    @property
    def full_size(self) -> np.ndarray:
        """Whether the epoch trained and validated at the table's size: only such an epoch's val_acc is a result."""
        return self.sizes == self.sizes.max()

    seconds: np.ndarray


@dataclass(frozen=True)
class CurveTable:
    """A model's recorded curves, and the way from a proposed configuration to the nearest recorded one."""

    model: str
    configs: list[dict]
    """The hyperparameter values of each recorded configuration, by id; 0 is the recipe."""
    curves: dict[str, Curves]
    scales: list[Scale]

    @classmethod
    def read(cls, path: Path, model: str) -> CurveTable:
        """The configurations whose every curve is whole (a recording stopped early leaves a shorter table; two
        recordings of one draw from different --first-config fill it from both ends), in id order."""
        with path.open(newline="") as file:
            rows = list(csv.DictReader(file))
        if not rows:
            raise SystemExit(f"{path} holds no curves: record them with `search_efficiency.py record --model {model}`")
        epochs = max(int(row["epoch"]) for row in rows)
        by_curve: dict[tuple[str, int], list[dict]] = {}
        for row in rows:
            by_curve.setdefault((row["curve"], int(row["config"])), []).append(row)
        ids = sorted({number for _, number in by_curve})
        whole = [n for n in ids if all(len(by_curve.get((curve, n), [])) == epochs for curve in CURVES)]
        if not whole or whole[0] != 0:
            raise SystemExit(f"{path} lacks the recipe's (configuration 0) curves: record them")
        names = [name for name in rows[0] if name not in NOT_HYPERPARAMETERS]
        configs = [typed_config(by_curve[(FULL, number)][0], names) for number in whole]
        curves = {
            curve: curves_of([sorted(by_curve[(curve, n)], key=lambda r: int(r["epoch"])) for n in whole])
            for curve in CURVES
        }
        # A knob added after the recording (class_weighting) trained at its default throughout: no coordinate.
        return cls(model, configs, curves, [scale for scale in scales_of(model) if scale.name in names])

    @property
    def epochs(self) -> int:
        return self.curves[FULL].val_acc.shape[1]

    @property
    def img_size(self) -> int:
        return int(self.curves[FULL].sizes.max())

    @property
    def target(self) -> float:
        """The best val_acc any configuration ends its full-size curve with; a study reaches it within WITHIN."""
        return float(np.nanmax(self.curves[FULL].val_acc[:, -1]))

    @property
    def recipe_score(self) -> float:
        """What training the recipe once gives: configuration 0's last full-size epoch."""
        return float(self.curves[FULL].val_acc[0, -1])

    @property
    def level(self) -> float:
        """What a study must reach: within WITHIN of the target."""
        return self.target - WITHIN

    @property
    def top_level(self) -> float:
        """The final val_acc of the table's best TOP_SHARE of configurations (its quantile)."""
        return float(np.quantile(np.nan_to_num(self.curves[FULL].val_acc[:, -1]), 1 - TOP_SHARE))

    def share_reaching(self, level: float) -> float:
        """The share of configurations that end at `level` or above: how easy it is for any search."""
        final = self.curves[FULL].val_acc[:, -1]
        return float(np.mean(np.nan_to_num(final, nan=0.0) >= level - 1e-9))

    def nearest(self, config: dict) -> int:
        """The recorded configuration nearest to `config` (a knob it leaves out at its default)."""
        return int(np.argmin(distances(self.scales, self.coordinates, {**DEFAULTS.to_dict(), **config})))

    @functools.cached_property
    def coordinates(self) -> np.ndarray:
        """(configurations, scales): each recorded configuration's coordinate on each scale (a categorical's value)."""
        return np.array([[coordinate(scale, config[scale.name]) for scale in self.scales] for config in self.configs])


NOT_HYPERPARAMETERS = {
    "curve",
    "config",
    "epoch",
    "img_size",
    "compute",
    "val_acc",
    "val_loss",
    "train_loss",
    "seconds",
}


def typed_config(row: dict, names: list[str]) -> dict:
    """A CSV row's hyperparameters, each as its knob's type (its default's: float, int or str)."""
    return {name: type(getattr(DEFAULTS, name))(row[name]) for name in names}


def curves_of(rows: list[list[dict]]) -> Curves:
    def column(name: str, kind=float) -> np.ndarray:
        return np.array([[kind(row[name]) for row in curve] for curve in rows])

    return Curves(
        val_acc=column("val_acc"),
        compute=column("compute"),
        sizes=column("img_size", int),
        seconds=column("seconds"),
    )


@dataclass(frozen=True)
class Scale:
    """A searched hyperparameter's coordinate on [0, 1] over the union of its ranges in the old and new spaces
    (their `or` values included), on a log scale where a space searches it so; categorical: None."""

    name: str
    low: float = 0.0
    high: float = 1.0
    log: bool = False
    categorical: bool = False
    choices: tuple = ()
    """A categorical's choices in either space: its coordinate is a choice's place among them."""

    def unit(self, value: float) -> float:
        if self.log:
            return (math.log(value) - math.log(self.low)) / (math.log(self.high) - math.log(self.low))
        return (value - self.low) / (self.high - self.low)


def scales_of(model: str) -> list[Scale]:
    """One Scale per hyperparameter either space searches."""
    ranges: dict[str, list[Parameter]] = {}
    for space in (new_space(model), old_space(model)):
        for parameter in space.parameters:
            if parameter.type != "fixed":
                ranges.setdefault(parameter.name, []).append(parameter)
    scales = []
    for name, parameters in ranges.items():
        if any(parameter.type == "categorical" for parameter in parameters):
            choices = tuple(dict.fromkeys(choice for parameter in parameters for choice in parameter.values()))
            scales.append(Scale(name, categorical=True, choices=choices))
            continue
        values = [v for parameter in parameters for v in parameter.values()]
        scales.append(Scale(name, min(values), max(values), log=any(parameter.log for parameter in parameters)))
    return scales


def coordinate(scale: Scale, value) -> float:
    """A value on its scale: [0, 1] for a number; a categorical's place among its choices (text ones too)."""
    return float(scale.choices.index(value)) if scale.categorical else scale.unit(value)


def distances(scales: list[Scale], recorded: np.ndarray, proposed: dict) -> np.ndarray:
    """Euclidean from each row of `recorded` (CurveTable.coordinates) over the scales; a categorical mismatch
    counts 1."""
    point = np.array([coordinate(scale, proposed[scale.name]) for scale in scales])
    categorical = np.array([scale.categorical for scale in scales])
    gaps = np.where(categorical, (recorded != point).astype(float), recorded - point)
    return np.sqrt((gaps**2).sum(axis=1))


# ---------------------------------------------------------------- replay: the spaces


OLD_SPACES = {
    "cnn": """
parameters:
  lr:              {type: float, low: 1.0e-4, high: 3.0e-3, log: true}
  weight_decay:    {type: float, low: 1.0e-5, high: 0.1, log: true}
  batch_size:      {type: categorical, choices: [16, 32]}
  dropout:         {type: float, low: 0.0, high: 0.5}
  label_smoothing: {type: float, low: 0.0, high: 0.2}
  hflip:           {type: categorical, choices: [0.0, 0.5]}
  vflip:           {type: fixed, value: 0.0}
  rotation_deg:    {type: float, low: 0.0, high: 30.0}
  color_jitter:    {type: float, low: 0.0, high: 0.4}
  noise_std:       {type: float, low: 0.0, high: 0.05}
  drop_path_rate:  {type: float, low: 0.0, high: 0.3}
""",
    "vit": """
parameters:
  lr:              {type: float, low: 5.0e-5, high: 2.0e-3, log: true}
  weight_decay:    {type: float, low: 1.0e-4, high: 0.3, log: true}
  batch_size:      {type: categorical, choices: [16, 32]}
  dropout:         {type: float, low: 0.0, high: 0.3}
  label_smoothing: {type: float, low: 0.0, high: 0.2}
  hflip:           {type: categorical, choices: [0.0, 0.5]}
  vflip:           {type: fixed, value: 0.0}
  rotation_deg:    {type: float, low: 0.0, high: 30.0}
  color_jitter:    {type: float, low: 0.0, high: 0.4}
  noise_std:       {type: float, low: 0.0, high: 0.05}
  drop_path_rate:  {type: float, low: 0.0, high: 0.2}
  vit_depth:       {type: int, low: 3, high: 12}
""",
}
"""spaces/<model>.yaml before issue 25 (commit 3f4e8de): every augmentation a magnitude from 0, no switches.
Today's run.py arm searches it."""


@functools.cache
def new_space(model: str) -> Space:
    return load_space(ROOT / "spaces" / f"{model}.yaml", model)


@functools.cache
def old_space(model: str) -> Space:
    problems: list[str] = []
    parameters = parse_document(yaml.safe_load(OLD_SPACES[model]), model, problems)
    assert not problems, problems
    return Space(f"spaces/{model}.yaml before issue 25", tuple(parameters))


# ---------------------------------------------------------------- replay: the arms


@dataclass(frozen=True)
class Arm:
    """A searcher + scheduler pair, as run.py would set it up."""

    name: str
    sampler: str = "tpe"
    """'random' (Optuna's RandomSampler) or 'tpe' (search.study.tuning.tpe_sampler)."""
    tuned: bool = False
    """tpe_sampler's tuned: multivariate + group, constant liar, start-up trials sized to the budget."""
    asha: bool = True
    recipe: bool = False
    """The recipe first (queued as run.py queues it), never stopped by ASHA (RecipeKeepingASHA)."""
    old: bool = False
    """Searches the space as it was before issue 25 (OLD_SPACES) instead of spaces/<model>.yaml."""
    curve: str = FULL
    """FULL: every epoch at the table's size; RESOLUTION: run.py's --fidelity resolution schedule."""


BASELINE = "random"
ARMS = (
    Arm(BASELINE, sampler="random", asha=False),
    Arm("random + ASHA", sampler="random"),
    Arm("today's run.py: TPE + ASHA, old space", old=True),
    Arm("TPE + ASHA"),
    Arm("tuned TPE + ASHA", tuned=True),
    Arm("TPE + ASHA + recipe", recipe=True),
    Arm("tuned TPE + ASHA + recipe", tuned=True, recipe=True),
    Arm("TPE + ASHA + recipe + resolution", recipe=True, curve=RESOLUTION),
    Arm("tuned TPE + ASHA + recipe + resolution", tuned=True, recipe=True, curve=RESOLUTION),
)
TRIALS = 30
SLOTS = 2
"""Trials at once: two trials share one GPU in a study."""


def make_searcher(model: str, arm: Arm, seed: int, trials: int):
    """The project's PruneAwareOptunaSearch over the arm's space, in memory, with the arm's sampler."""
    import optuna

    from search.study.tuning import PruneAwareOptunaSearch, tpe_sampler

    space = old_space(model) if arm.old else new_space(model)
    if arm.sampler == "random":
        sampler: optuna.samplers.BaseSampler = optuna.samplers.RandomSampler(seed=seed)
    else:
        sampler = tpe_sampler(seed, trials, tuned=arm.tuned)
    return PruneAwareOptunaSearch(
        space=space.sample,
        switches=space.switches,
        metric="val_acc",
        mode="max",
        sampler=sampler,
        points_to_evaluate=[space.recipe()] if arm.recipe else None,
    )


def make_scheduler(arm: Arm, epochs: int):
    """run.py's scheduler (RecipeKeepingASHA with its defaults, max_t the table's epochs), or none (FIFO)."""
    from ray.tune.schedulers import FIFOScheduler

    from search.study.tuning import RecipeKeepingASHA

    if not arm.asha:
        return FIFOScheduler()
    return RecipeKeepingASHA(
        time_attr="epoch",
        metric="val_acc",
        mode="max",
        max_t=epochs,
        grace_period=min(GRACE_PERIOD, epochs),
        reduction_factor=REDUCTION_FACTOR,
        recipe=arm.recipe,
    )


# ---------------------------------------------------------------- replay: one study


@dataclass(frozen=True)
class Study:
    """Every epoch a replayed study spent, in the order they ended."""

    compute: np.ndarray
    val_acc: np.ndarray
    full_size: np.ndarray
    configs: tuple[int, ...]
    """The recorded configuration each trial replayed, in the order the trials started."""

    def best_so_far(self) -> np.ndarray:
        """The study's best result after each epoch: full-size epochs only (a 16 px val_acc is not a result)."""
        results = np.where(self.full_size & ~np.isnan(self.val_acc), self.val_acc, -np.inf)
        return np.maximum.accumulate(results)

    @property
    def best(self) -> float:
        return float(self.best_so_far()[-1])

    @property
    def total(self) -> float:
        return float(self.compute.sum())

    def compute_to(self, level: float) -> float:
        """The compute spent (every trial's, in time order) until the best so far reaches `level` (the target less
        WITHIN), the epoch that gets there included; inf when it never does."""
        reached = np.flatnonzero(self.best_so_far() >= level - 1e-9)
        return float(np.cumsum(self.compute)[reached[0]]) if reached.size else math.inf


@dataclass
class Running:
    """A trial in a slot: the recorded configuration it replays, the epochs it has done, when its epoch ends."""

    trial: Any
    config: int
    done: int
    ends_at: float


def run_study(table: CurveTable, arm: Arm, seed: int, trials: int = TRIALS, slots: int = SLOTS) -> Study:
    """One study as a discrete-event simulation: `slots` trials at once, each epoch lasting its compute; every
    result reaches the scheduler and the searcher in time order, through their Ray Tune interfaces."""
    from ray.tune.schedulers import TrialScheduler

    searcher = make_searcher(table.model, arm, seed, trials)
    scheduler = make_scheduler(arm, table.epochs)
    curves = table.curves[arm.curve]
    full_size = curves.full_size
    running: list[Running] = []
    spent: list[tuple[float, float, bool]] = []
    configs: list[int] = []
    now = 0.0

    def start() -> None:
        number = len(configs)
        # Tune's trial as the scheduler reads it: its id, and its tag that starts with its counter from 1.
        trial = SimpleNamespace(trial_id=f"t{number:02d}", experiment_tag=f"{number + 1}")
        config = table.nearest(searcher.suggest(trial.trial_id))
        configs.append(config)
        scheduler.on_trial_add(None, trial)
        running.append(Running(trial, config, 0, now + curves.compute[config, 0]))

    while len(running) < min(slots, trials):
        start()
    while running:
        current = min(running, key=lambda each: each.ends_at)  # the first started wins a tie: min keeps order
        now, epoch = current.ends_at, current.done + 1
        val_acc = float(curves.val_acc[current.config, epoch - 1])
        spent.append((float(curves.compute[current.config, epoch - 1]), val_acc, full_size[current.config, epoch - 1]))
        if end_of_trial(searcher, scheduler, current.trial, epoch, val_acc, table.epochs, TrialScheduler.STOP):
            running.remove(current)
            if len(configs) < trials:
                start()
        else:
            current.done, current.ends_at = epoch, now + curves.compute[current.config, epoch]
    compute, val_acc, full_size = (np.array(column) for column in zip(*spent, strict=True))
    return Study(compute, val_acc, full_size.astype(bool), tuple(configs))


def end_of_trial(searcher, scheduler, trial, epoch: int, val_acc: float, epochs: int, stop: str) -> bool:
    """Hand an epoch's result to the scheduler and the searcher as Tune's controller does; True: the trial ends."""
    if math.isnan(val_acc):  # the recorded configuration diverged: the trial fails
        scheduler.on_trial_error(None, trial)
        searcher.on_trial_complete(trial.trial_id, None, error=True)
        return True
    result = {"epoch": epoch, "training_iteration": epoch, "val_acc": val_acc, "finished": epoch == epochs}
    decision = scheduler.on_trial_result(None, trial, result)
    if decision != stop:
        searcher.on_trial_result(trial.trial_id, result)  # Tune tells the searcher only results it goes on from
    if decision != stop and epoch < epochs:
        return False
    searcher.on_trial_complete(trial.trial_id, result)
    scheduler.on_trial_complete(None, trial, result)
    return True


def replay_table(table: CurveTable, arms: tuple[Arm, ...], seeds: list[int], trials: int = TRIALS) -> dict:
    """{arm name: [Study per seed]}: the same seeds for every arm."""
    quiet()
    return {arm.name: [run_study(table, arm, seed, trials) for seed in seeds] for arm in arms}


def quiet() -> None:
    import warnings

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


# ---------------------------------------------------------------- replay: the numbers


RESAMPLES = 10_000


@dataclass(frozen=True)
class Interval:
    """A statistic over the seeds and its 95 % bootstrap interval (seeds resampled, seeded)."""

    value: float
    low: float
    high: float

    def text(self, digits: int = 1, signed: bool = False) -> str:
        def number(x: float) -> str:
            if math.isnan(x):
                return "—"
            if math.isinf(x):
                return ("-" if x < 0 else "") + "∞"
            return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"

        return f"{number(self.value)} [{number(self.low)}, {number(self.high)}]"


def median(values: np.ndarray, axis: int = -1) -> np.ndarray:
    """The median that keeps inf (a study that never got there) as a value: the lower middle one of an even count,
    so that no inf - inf or inf / inf is taken."""
    return np.quantile(values, 0.5, axis=axis, method="inverted_cdf")


def bootstrap(statistic, *samples: np.ndarray) -> Interval:
    """statistic(*samples) and its 95 % percentile interval over RESAMPLES resamples of the seeds (paired: the same
    resampled seeds for every sample)."""
    rng = np.random.default_rng(0)
    picks = rng.integers(0, len(samples[0]), size=(RESAMPLES, len(samples[0])))
    resampled = statistic(*(sample[picks] for sample in samples))
    low, high = np.quantile(resampled, [0.025, 0.975], method="inverted_cdf")
    return Interval(float(statistic(*samples)), float(low), float(high))


def ratio_of_medians(arm: np.ndarray, base: np.ndarray) -> np.ndarray:
    """Where neither median is finite the ratio counts as inf: not shown to save anything."""
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.asarray(median(arm) / median(base))
    return np.where(np.isnan(ratio), np.inf, ratio)


def paired_differences(arm: np.ndarray, base: np.ndarray) -> np.ndarray:
    """arm - base per seed; two studies that both never got there differ by 0 (inf - inf is not taken)."""
    both = np.isinf(arm) & np.isinf(base) & (np.sign(arm) == np.sign(base))
    with np.errstate(invalid="ignore"):
        return np.where(both, 0.0, arm - base)


@dataclass(frozen=True)
class Outcomes:
    """One arm's studies, per seed: compute to within WITHIN of the table's target (inf: never), the best val_acc
    at the end, the compute spent."""

    to_target: np.ndarray
    best: np.ndarray
    total: np.ndarray
    distinct: np.ndarray
    """Recorded configurations a study replayed, each counted once: where a searcher proposes points near one it
    likes, the table gives it that one again (a real study would try a new neighbour)."""

    @classmethod
    def of(cls, table: CurveTable, runs: list[Study], level: float | None = None) -> Outcomes:
        """level: what counts as reached (default: within WITHIN of the table's target)."""
        level = table.level if level is None else level
        return cls(
            np.array([study.compute_to(level) for study in runs]),
            np.array([study.best for study in runs]),
            np.array([study.total for study in runs]),
            np.array([len(set(study.configs)) for study in runs]),
        )


@dataclass(frozen=True)
class Comparison:
    """Arm a against arm b on the same seeds."""

    ratio: Interval
    """Median compute to target of a over b's, the seeds resampled in pairs."""
    difference: Interval
    """Median of the paired differences in compute to target, a - b."""
    fewer_same_more: tuple[int, int, int]
    """Seeds where a reached the target with less, the same, more compute than b."""
    best_difference: Interval
    """Median of the paired differences in the best val_acc at the end, a - b, in points."""

    @classmethod
    def of(cls, a: Outcomes, b: Outcomes) -> Comparison:
        differences = paired_differences(a.to_target, b.to_target)
        return cls(
            ratio=bootstrap(ratio_of_medians, a.to_target, b.to_target),
            difference=bootstrap(lambda x, y: median(paired_differences(x, y)), a.to_target, b.to_target),
            fewer_same_more=(int((differences < 0).sum()), int((differences == 0).sum()), int((differences > 0).sum())),
            best_difference=bootstrap(lambda x, y: median(100 * (x - y)), a.best, b.best),
        )


def arm_row(name: str, outcomes: Outcomes, against_random: Comparison, recipe_score: float) -> tuple[str, ...]:
    return (
        name,
        bootstrap(median, outcomes.to_target).text(),
        f"{int(np.isfinite(outcomes.to_target).sum())}/{len(outcomes.to_target)}",
        "baseline" if name == BASELINE else against_random.ratio.text(2),
        "baseline" if name == BASELINE else against_random.difference.text(1, signed=True),
        bootstrap(median, outcomes.best).text(4),
        "baseline" if name == BASELINE else against_random.best_difference.text(1, signed=True),
        bootstrap(median, outcomes.total).text(1),
        f"{int((outcomes.best < recipe_score - 1e-9).sum())}/{len(outcomes.best)}",
        f"{np.median(outcomes.distinct):.0f}",
    )


COLUMNS = (
    "arm",
    "compute to the level, median [95 % CI]",
    "reached",
    "vs random: ratio of medians",
    "vs random: paired difference",
    "best val_acc after the trials",
    "vs random: paired difference in best (points)",
    "compute per study",
    "ended below the recipe",
    "distinct configurations (median)",
)

DECISIONS = (
    ("tuned TPE (with the recipe)", "tuned TPE + ASHA + recipe", "TPE + ASHA + recipe"),
    ("tuned TPE (without)", "tuned TPE + ASHA", "TPE + ASHA"),
    ("the recipe first (TPE)", "TPE + ASHA + recipe", "TPE + ASHA"),
    ("the recipe first (tuned TPE)", "tuned TPE + ASHA + recipe", "tuned TPE + ASHA"),
    ("resolution fidelity (TPE + recipe)", "TPE + ASHA + recipe + resolution", "TPE + ASHA + recipe"),
    ("resolution fidelity (tuned + recipe)", "tuned TPE + ASHA + recipe + resolution", "tuned TPE + ASHA + recipe"),
    ("the new space (TPE + ASHA)", "TPE + ASHA", "today's run.py: TPE + ASHA, old space"),
    ("ASHA (random)", "random + ASHA", "random"),
)
"""(question, a, b): the paired comparisons a default follows from."""
DECISION_COLUMNS = (
    "question (a vs b)",
    "ratio of medians a / b",
    "paired difference a - b (median)",
    "seeds a fewer / same / more",
    "paired difference in best (points)",
)


def decision_rows(outcomes: dict[str, Outcomes]) -> list[tuple[str, ...]]:
    rows = []
    for question, a, b in DECISIONS:
        if a in outcomes and b in outcomes:
            comparison = Comparison.of(outcomes[a], outcomes[b])
            rows.append(
                (
                    question,
                    comparison.ratio.text(2),
                    comparison.difference.text(1, signed=True),
                    "/".join(map(str, comparison.fewer_same_more)),
                    comparison.best_difference.text(1, signed=True),
                )
            )
    return rows


def describe(table: CurveTable, seeds: list[int], trials: int) -> list[str]:
    full, resolution = table.curves[FULL], table.curves[RESOLUTION]
    schedule = ", ".join(str(int(size)) for size in resolution.sizes[0])
    minutes = (full.seconds.sum() + resolution.seconds.sum()) / 60
    return [
        f"Task: digits, {PER_CLASS} training images a class, the whole validation split, {table.model} from random "
        f"init at {table.img_size} px.",
        f"Table: {len(table.configs)} configurations (0: the recipe; then drawn at random from "
        f"spaces/{table.model}.yaml) x {table.epochs} epochs, two curves each: every epoch at {table.img_size} px, "
        f"and the resolution schedule ({schedule} px). Recorded in {minutes:.0f} min of training on one CPU thread "
        f"of a shared machine ({full.seconds.sum() / 60:.0f} min for the {table.img_size} px curves).",
        f"Target: {table.target:.4f} (the best final-epoch val_acc at {table.img_size} px), reached within "
        f"{WITHIN:g}: {round(table.share_reaching(table.level) * len(table.configs))} of the configurations end "
        f"there (the best {100 * TOP_SHARE:g} % end at {table.top_level:.4f} or above). The recipe ends at "
        f"{table.recipe_score:.4f}.",
        resolution_line(table),
        f"Studies: seeds {seeds[0]}-{seeds[-1]} for every arm, {trials} trials each, {SLOTS} at once; ASHA: grace "
        f"period {GRACE_PERIOD}, reduction factor {REDUCTION_FACTOR}, max_t {table.epochs}.",
    ]


def resolution_line(table: CurveTable) -> str:
    """Whether the resolution curves' early epochs rank the configurations as the full-size ones do, and what the
    configurations end with on them."""
    from scipy.stats import spearmanr

    full, resolution = table.curves[FULL], table.curves[RESOLUTION]
    final = np.nan_to_num(full.val_acc[:, -1])
    rung = min(GRACE_PERIOD, table.epochs) - 1

    def rho(curves: Curves) -> float:
        return float(spearmanr(np.nan_to_num(curves.val_acc[:, rung]), final)[0])

    return (
        f"Resolution curves: their epoch {rung + 1} (ASHA's first rung, at {int(resolution.sizes[0, rung])} px) ranks "
        f"the configurations by their final {table.img_size} px val_acc with Spearman ρ {rho(resolution):.2f}, "
        f"the {table.img_size} px curves' epoch {rung + 1} with {rho(full):.2f}; they end at a median val_acc of "
        f"{np.nanmedian(resolution.val_acc[:, -1]):.4f} (best {np.nanmax(resolution.val_acc[:, -1]):.4f}) against "
        f"{np.nanmedian(full.val_acc[:, -1]):.4f} ({table.target:.4f}) at {table.img_size} px throughout."
    )


def text_table(columns: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    cells = [columns, *rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def markdown_table(columns: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    return [
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
        *("| " + " | ".join(r) + " |" for r in rows),
    ]


def ratio_cells(outcomes: dict[str, Outcomes]) -> dict[str, str]:
    """Per arm: its ratio of compute to target against random's, and how many seeds reached it."""
    cells = {}
    for arm, each in outcomes.items():
        ratio = bootstrap(ratio_of_medians, each.to_target, outcomes[BASELINE].to_target)
        text = "baseline" if arm == BASELINE else ratio.text(2)
        cells[arm] = f"{text} ({int(np.isfinite(each.to_target).sum())}/{len(each.to_target)})"
    return cells


def side_by_side(cells: dict[str, dict[str, str]]) -> list[tuple[str, ...]]:
    """arm, then a cell per column (model and reach)."""
    columns = list(cells)
    return [(arm, *(cells[column][arm] for column in columns)) for arm in cells[columns[0]]]


def plot(tables: dict[str, CurveTable], studies: dict[str, dict[str, list[Study]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes_row = plt.subplots(1, len(tables), figsize=(7 * len(tables), 5), squeeze=False)
    for axes, (model, table) in zip(axes_row[0], tables.items(), strict=True):
        horizon = max(study.total for runs in studies[model].values() for study in runs)
        grid = np.geomspace(1, horizon, 400)
        for arm, runs in studies[model].items():
            curves = np.stack([best_at(study, grid) for study in runs])
            style = "--" if RESOLUTION in arm else "-"
            median_curve = np.quantile(curves, 0.5, axis=0, method="inverted_cdf")
            axes.plot(grid, median_curve, style, label=arm, linewidth=1.3)
        axes.axhline(table.target - WITHIN, color="black", linestyle="--", linewidth=1, label=f"target - {WITHIN:g}")
        axes.axhline(table.recipe_score, color="grey", linestyle=":", linewidth=1, label="the recipe, trained once")
        axes.set_xscale("log")  # the arms part in their first tens of epochs
        axes.set_xlim(1, horizon)
        axes.set_ylim(0, table.target + 0.05)
        axes.set_xlabel("compute spent (full-resolution epochs, all trials)")
        axes.set_ylabel(f"best val_acc so far (at {table.img_size} px)")
        axes.set_title(f"{model} on digits, {PER_CLASS} train images a class: median over {len(runs)} seeds")
        axes.grid(alpha=0.3)
        axes.legend(loc="lower right", fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def best_at(study: Study, grid: np.ndarray) -> np.ndarray:
    """The study's best so far at each compute of the grid (0 before its first result)."""
    spent = np.cumsum(study.compute)
    best = np.maximum(study.best_so_far(), 0.0)
    index = np.searchsorted(spent, grid, side="right") - 1
    return np.where(index >= 0, best[np.clip(index, 0, None)], 0.0)


def levels(table: CurveTable) -> dict[str, float]:
    """What a study must reach, two ways: within WITHIN of the target (the lead number), and the table's top
    TOP_SHARE (where one configuration alone is within WITHIN of the best, the first is finding that one)."""
    return {
        f"within {100 * WITHIN:g} point of the best": table.level,
        f"the top {100 * TOP_SHARE:g} %": table.top_level,
    }


def replay(args: argparse.Namespace) -> None:
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    tables = {
        model: CurveTable.read(args.curves_dir / curves_csv(model, args.img_size).name, model) for model in args.models
    }
    lines = [
        "# Search efficiency: compute until a study is within 1 point of the best",
        "",
        "Made by `python bench/search_efficiency.py replay` (the method: its docstring); the plot is "
        "search_efficiency.png. Compute is in full-resolution epochs; intervals are 95 % bootstrap intervals over "
        "the seeds; a study that never reached the target counts as infinite (∞).",
        "",
    ]
    studies: dict[str, dict[str, list[Study]]] = {}
    ratios: dict[str, dict[str, str]] = {}
    for model, table in tables.items():
        started = time.time()
        studies[model] = replay_table(table, ARMS, seeds, args.trials)
        header = [*describe(table, seeds, args.trials), f"Replay: {time.time() - started:.0f} s."]
        print(f"\n{model}\n" + "\n".join(header), flush=True)
        lines += [f"## {model}", "", *(f"{line}  " for line in header), ""]
        for name, level in levels(table).items():
            outcomes = {arm: Outcomes.of(table, runs, level) for arm, runs in studies[model].items()}
            against = {arm: Comparison.of(each, outcomes[BASELINE]) for arm, each in outcomes.items()}
            ratios[f"{model}, {name}"] = ratio_cells(outcomes)
            rows = [arm_row(arm, outcomes[arm], against[arm], table.recipe_score) for arm in outcomes]
            decisions = decision_rows(outcomes)
            title = f"{model}: compute to {name} ({level:.4f})"
            print(f"\n{title}\n" + text_table(COLUMNS, rows) + "\n\n" + text_table(DECISION_COLUMNS, decisions))
            lines += [f"### {title}", "", *markdown_table(COLUMNS, rows), ""]
            lines += ["Paired comparisons:", "", *markdown_table(DECISION_COLUMNS, decisions), ""]
    side = side_by_side(ratios)
    title = "Compute to each level over random search's: ratio of medians [95 % CI] (seeds that got there)"
    print(f"\n{title}:\n" + text_table(("arm", *ratios), side))
    lines += [f"## {title}", "", *markdown_table(("arm", *ratios), side)]
    args.markdown.write_text("\n".join([*lines, ""]), encoding="utf-8")
    plot(tables, studies, args.plot)
    print(f"\nwrote {args.markdown} and {args.plot}")


# ---------------------------------------------------------------- the command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    steps = parser.add_subparsers(dest="step", required=True)
    rec = steps.add_parser(
        "record",
        help="train configurations on the digits, write a model's curve table",
        formatter_class=parser.formatter_class,
    )
    rec.add_argument("--model", choices=MODELS, required=True)
    rec.add_argument("--configs", type=int, default=60, help="configurations drawn besides the recipe")
    rec.add_argument("--epochs", type=int, default=8, help="epochs per curve (ASHA's max_t in the replay)")
    rec.add_argument("--seed", type=int, default=0, help="RandomSampler seed of the draw")
    rec.add_argument("--img-size", type=int, default=IMG_SIZE, help="the study's image size (its last epochs')")
    rec.add_argument(
        "--first-config",
        type=int,
        default=0,
        help="start at this configuration of the draw: a second process records the rest into another --out, "
        "whose rows are then appended to the table",
    )
    rec.add_argument(
        "--out", type=Path, help="the curve table (CSV); default bench/search_efficiency_curves_<model>.csv"
    )
    rep = steps.add_parser(
        "replay", help="replay every arm's studies against the tables", formatter_class=parser.formatter_class
    )
    rep.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    rep.add_argument("--seeds", type=int, default=50, help="studies per arm, the same seeds for every arm")
    rep.add_argument(
        "--first-seed",
        type=int,
        default=1,
        help="seeds run from here; not record's 0, whose RandomSampler would propose the recorded configurations",
    )
    rep.add_argument("--trials", type=int, default=TRIALS, help="trials per study")
    rep.add_argument("--img-size", type=int, default=IMG_SIZE, help="replay the tables recorded at this size")
    rep.add_argument("--curves-dir", type=Path, default=BENCH, help="where the curve tables (CSV) are")
    rep.add_argument("--markdown", type=Path, default=BENCH / "search_efficiency.md", help="the tables (Markdown)")
    rep.add_argument("--plot", type=Path, default=BENCH / "search_efficiency.png", help="the plot (PNG)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.step == "record":
        out = args.out or curves_csv(args.model, args.img_size)
        record(args.model, args.configs, args.epochs, args.seed, args.img_size, out, args.first_config)
    else:
        replay(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
