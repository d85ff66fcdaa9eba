"""Search efficiency: the epochs each searcher + scheduler pair spends before it finds a near-best configuration.

    python bench/search_efficiency.py record [--configs 40] [--epochs 8]   # about 35 min on one CPU core
    python bench/search_efficiency.py replay [--seeds 20] [--trials 30]    # about 15 min on 2 CPU cores

record: draws --configs configurations of spaces/vit.yaml (Optuna's RandomSampler, seeded, through the project's
own `Space.sample`) and trains each with the project's engine (Learner, fit) on scikit-learn's `load_digits`
(1,797 8x8 grey digits, 10 classes) written as PNG class folders and decoded by the project's data code into
32 px RGB, split 70/15/15 (stratified, seed 0; the validation split is scored). Random init, one torch thread,
the full --epochs for every configuration (early stopping is held off so that every curve is whole). One row
per configuration and epoch goes to bench/search_efficiency_curves.csv (committed data); an interrupted
recording continues where it stopped.

replay: runs real Ray Tune studies against that table, --seeds times for each of four pairs: TPE + ASHA (what
run.py does), TPE alone, random + ASHA, random alone. The searcher is the project's PruneAwareOptunaSearch
over the same `Space.sample` (TPESampler or RandomSampler, seeded), the scheduler the project's ASHAScheduler
(time_attr epoch, run.py's grace period and reduction factor, max_t = the table's epochs) or FIFO. The trial
does not train: it takes the recorded configuration nearest to the one proposed and reports that one's curve,
epoch by epoch, sleeping --pace seconds per recorded second so that concurrent trials interleave as real ones
would. Two trials run at once, as two trials share one GPU in a study.

Measured, per study: the epochs reported, in the order Tune received them, until the best val_acc seen so far
(the study's own score: its best trial's best epoch) comes within 0.01 of the table's best. The table's best
is taken two ways (CurveTable.targets): the best val_acc any configuration ends its epochs with (the lead
number), and the best of any configuration at any epoch (the maximum of configurations x epochs noisy readings,
which may be one lucky epoch of one configuration). Printed, and written to bench/search_efficiency.md, for
each: per pair the median and interquartile range of those epochs over the seeds (a study that never got there
counts as infinitely many), how many seeds got there within --trials trials, the ratio of medians to random
alone, the epochs a whole study spent and the best val_acc it found. bench/search_efficiency.png plots the
best val_acc found against the epochs spent (median over seeds, interquartile band shaded; a study that ended
keeps its best). Two trials at once make a study's order depend on timing: the same seed can give another
study on a rerun, which is why the numbers are medians over seeds.

Nearest configuration: each searched parameter in its own coordinates scaled to [0, 1] by the space's bounds
(log parameters on a log scale), a categorical mismatch counting 1; Euclidean distance over the parameters.
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: the project's packages import

from search.study.spaces import Parameter, Space, load_space  # noqa: E402

MODEL = "vit"
SPACE_FILE = ROOT / "spaces" / "vit.yaml"
CURVES_CSV = ROOT / "bench" / "search_efficiency_curves.csv"
REPORT_MD = ROOT / "bench" / "search_efficiency.md"
PLOT_PNG = ROOT / "bench" / "search_efficiency.png"
IMG_SIZE = 32
SPLIT_SEED = 0
TRAIN_SEED = 0
"""One training seed for every configuration, as one study seeds every trial alike: configs compare fairly."""
WITHIN = 0.01
"""'Within 1 point': the best val_acc found >= the table's best - WITHIN."""


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


def digits_splits(workdir: Path):
    """Train and val of the digits as the project caches any class folder: split by seed, decoded to 32 px RGB."""
    from trainables.data import cache_split, index_source

    index = index_source(write_digits_folder(workdir / "digits"), SPLIT_SEED)
    train, val = (cache_split(index, split, IMG_SIZE, workdir / "cache") for split in ("train", "val"))
    return train, val, len(index.classes)


# ---------------------------------------------------------------- record: configurations and curves


def draw_configs(space: Space, count: int, seed: int) -> list[dict]:
    """`count` configurations of the space, drawn by Optuna's RandomSampler through the space's own sampler."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=seed))
    configs = []
    for _ in range(count):
        trial = study.ask()
        constants = space.sample(trial)
        configs.append({**trial.params, **constants})
    return configs


def train_curve(config: dict, train, val, num_classes: int, epochs: int, seed: int = TRAIN_SEED):
    """Yield one row per epoch: the engine's val_acc, val_loss and train_loss, and the epoch's seconds."""
    import torch

    from trainables.config import Hyperparameters
    from trainables.engine import Learner, NonFiniteLoss, fit
    from trainables.models import ModelSpec, build_model

    # Early stopping off: the table needs every epoch of every curve.
    hp = Hyperparameters.from_dict({**config, "early_stop_patience": epochs + 1})
    torch.manual_seed(seed)  # the same initial weights for every configuration, as in train_trial
    spec = ModelSpec(MODEL, num_classes, IMG_SIZE, pretrained=False).with_knobs(hp)
    learner = Learner(build_model(spec), hp, torch.device("cpu"), "val_acc", seed)
    started = time.perf_counter()
    try:
        for result in fit(learner, train, val, epochs):
            seconds, started = time.perf_counter() - started, time.perf_counter()
            metrics = result.metrics
            yield {
                "epoch": result.epoch,
                "val_acc": metrics["val_acc"],
                "val_loss": metrics["val_loss"],
                "train_loss": metrics["train_loss"],
                "seconds": seconds,
            }
    except NonFiniteLoss:
        # A diverged configuration: its remaining epochs are NaN, and its replayed trial fails as a real one would.
        for epoch in range(learner.epoch + 1, epochs + 1):
            yield {"epoch": epoch, "val_acc": math.nan, "val_loss": math.nan, "train_loss": math.nan, "seconds": 0.0}


def recorded_configs(path: Path, space: Space, drawn: list[dict]) -> set[int]:
    """Configuration ids the table holds already (an interrupted recording continues), checked against this draw."""
    if not path.exists():
        return set()
    with path.open(newline="") as file:
        rows = list(csv.DictReader(file))
    missing = [parameter.name for parameter in searched(space) if rows and parameter.name not in rows[0]]
    if missing:
        raise SystemExit(f"{path} was recorded with another space (no {', '.join(missing)}): record into a new --out")
    for row in rows:
        number = int(row["config"])
        recorded = {parameter.name: typed_value(parameter, row[parameter.name]) for parameter in searched(space)}
        if number >= len(drawn) or any(not same_value(recorded[k], drawn[number][k]) for k in recorded):
            raise SystemExit(f"{path} holds other configurations than this draw: remove it, or record with its --seed")
    return {int(row["config"]) for row in rows}


def same_value(recorded, drawn) -> bool:
    """Equal, a float up to its CSV round trip."""
    return recorded == drawn or (isinstance(drawn, float) and math.isclose(recorded, drawn))


def append_rows(path: Path, rows: list[dict]) -> None:
    new = not path.exists()
    with path.open("a", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        if new:
            writer.writeheader()
        writer.writerows(rows)


def record(configs: int, epochs: int, seed: int, out: Path) -> None:
    import torch

    torch.set_num_threads(1)  # a shared 2-core machine: one core for the model
    space = load_space(SPACE_FILE, MODEL)
    drawn = draw_configs(space, configs, seed)
    done = recorded_configs(out, space, drawn)
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="bench-search-efficiency-") as workdir:
        train, val, num_classes = digits_splits(Path(workdir))
        print(f"digits at {IMG_SIZE} px: {len(train)} train, {len(val)} val images, {num_classes} classes", flush=True)
        for number, config in enumerate(drawn):
            if number in done:
                continue
            rows = []
            for row in train_curve(config, train, val, num_classes, epochs):
                rows.append({"config": number, **config, **row})
                print(
                    f"config {number:2d} epoch {row['epoch']:2d}  val_acc {row['val_acc']:.4f}  "
                    f"val_loss {row['val_loss']:.4f}  ({row['seconds']:.1f} s)",
                    flush=True,
                )
            append_rows(out, rows)  # whole curves only: a stopped recording redoes at most one configuration
    print(f"recorded {configs - len(done)} configurations x {epochs} epochs in {time.time() - started:.0f} s")


# ---------------------------------------------------------------- replay: the table


@dataclass(frozen=True)
class CurveTable:
    """The recorded curves, and the way from a proposed configuration to the nearest recorded one."""

    space: Space
    parameters: list[Parameter]
    """The searched parameters the table has a column for: the distance is taken over these. A table recorded
    before the space gained a knob (the committed one predates the per-augmentation knobs: it has the retired
    aug_strength instead) matches on the rest; `record` into a new file to match on every knob again."""
    configs: list[dict]
    """The searched values of each recorded configuration, by configuration id."""
    val_acc: np.ndarray
    """(configurations, epochs)."""
    val_loss: np.ndarray
    seconds: np.ndarray

    @classmethod
    def read(cls, path: Path, space: Space) -> CurveTable:
        with path.open(newline="") as file:
            rows = list(csv.DictReader(file))
        ids = sorted({int(row["config"]) for row in rows})
        epochs = max(int(row["epoch"]) for row in rows)
        if ids != list(range(len(ids))) or len(rows) != len(ids) * epochs:
            raise SystemExit(f"{path} does not hold whole curves: finish it with `search_efficiency.py record`")
        parameters = [parameter for parameter in searched(space) if parameter.name in rows[0]]
        by_id: dict[int, dict] = {}
        curves = {column: np.zeros((len(ids), epochs)) for column in ("val_acc", "val_loss", "seconds")}
        for row in rows:
            number, epoch = int(row["config"]), int(row["epoch"])
            by_id[number] = {parameter.name: typed_value(parameter, row[parameter.name]) for parameter in parameters}
            for column, curve in curves.items():
                curve[number, epoch - 1] = float(row[column])
        return cls(space, parameters, [by_id[number] for number in ids], **curves)

    @property
    def epochs(self) -> int:
        return self.val_acc.shape[1]

    def targets(self) -> dict[str, float]:
        """What 'within 1 point of the best' means, two ways; the first is the one the ratios lead with.

        final epoch: the best val_acc any configuration ends the budget with. any epoch: the best of any
        configuration at any epoch, the maximum of configurations x epochs noisy readings of a small
        validation split, which can be one configuration's one lucky epoch.
        """
        return {
            "final epoch": float(np.nanmax(self.val_acc[:, -1])) - WITHIN,
            "any epoch": float(np.nanmax(self.val_acc)) - WITHIN,
        }

    def nearest(self, config: dict) -> int:
        distances = [distance(self.parameters, config, recorded) for recorded in self.configs]
        return int(np.argmin(distances))


def searched(space: Space) -> list[Parameter]:
    return [parameter for parameter in space.parameters if parameter.type != "fixed"]


def typed_value(parameter: Parameter, text: str):
    """A CSV cell back as the parameter's value (a categorical's choice as the space writes it)."""
    if parameter.type == "categorical":
        return next(choice for choice in parameter.choices if str(choice) == text)
    return int(text) if parameter.type == "int" else float(text)


def unit_coordinate(parameter: Parameter, value: float) -> float:
    """value on [0, 1] between the space's bounds, on a log scale where the space searches one."""
    low, high = float(parameter.low), float(parameter.high)  # type: ignore[arg-type]
    if parameter.log:
        return (math.log(value) - math.log(low)) / (math.log(high) - math.log(low))
    return (value - low) / (high - low)


def distance(parameters: list[Parameter], proposed: dict, recorded: dict) -> float:
    """Euclidean over the given searched parameters, each scaled to [0, 1]; a categorical mismatch counts 1."""
    total = 0.0
    for parameter in parameters:
        a, b = proposed[parameter.name], recorded[parameter.name]
        if parameter.type == "categorical":
            total += float(a != b)
        else:
            total += (unit_coordinate(parameter, a) - unit_coordinate(parameter, b)) ** 2
    return math.sqrt(total)


# ---------------------------------------------------------------- replay: the studies


PAIRS = {
    "TPE + ASHA": ("tpe", True),
    "TPE alone": ("tpe", False),
    "random + ASHA": ("random", True),
    "random alone": ("random", False),
}
BASELINE = "random alone"
WITHOUT_ASHA = {"TPE + ASHA": "TPE alone", "random + ASHA": "random alone"}
"""Each ASHA pair's partner of the same sampler and seeds: RandomSampler proposes the same configurations
to both, so their difference is ASHA's alone."""


class DivergedCurve(RuntimeError):
    """The recorded configuration diverged at this epoch: the replayed trial fails as the real one did."""


def replay_trial(config: dict, table: CurveTable, pace: float) -> None:
    """A Ray Tune function trainable that reports the nearest recorded curve instead of training."""
    from ray import tune

    number = table.nearest(config)
    for epoch in range(1, table.epochs + 1):
        val_acc = float(table.val_acc[number, epoch - 1])
        if math.isnan(val_acc):
            raise DivergedCurve(f"recorded configuration {number} diverged in epoch {epoch}")
        time.sleep(pace * float(table.seconds[number, epoch - 1]))  # concurrent trials interleave as real ones
        tune.report(
            {
                "epoch": epoch,
                "val_acc": val_acc,
                "val_loss": float(table.val_loss[number, epoch - 1]),
                "table_config": number,
                "finished": epoch == table.epochs,  # what PruneAwareOptunaSearch tells COMPLETE from PRUNED by
            }
        )


def epoch_log():
    """A Tune callback that keeps every reported val_acc in the order the driver received it."""
    from ray.tune import Callback

    class EpochLog(Callback):
        def __init__(self):
            self.val_acc: list[float] = []

        def on_trial_result(self, iteration, trials, trial, result, **info):
            self.val_acc.append(result["val_acc"])

    return EpochLog()


def run_study(table: CurveTable, pair: str, seed: int, args: argparse.Namespace, storage: str) -> list[float]:
    """One real Tune study of the pair against the table; the val_acc of every epoch it spent, in order."""
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from search.records.study_config import STUDY_DEFAULTS
    from search.study.tuning import PruneAwareOptunaSearch

    sampler_name, asha = PAIRS[pair]
    # make_searcher's searcher with the sampler swapped; in memory, as the orchestration benchmark's.
    sampler = optuna.samplers.TPESampler(seed=seed) if sampler_name == "tpe" else optuna.samplers.RandomSampler(seed)
    searcher = PruneAwareOptunaSearch(space=table.space.sample, metric="val_acc", mode="max", sampler=sampler)
    # make_tuner's ASHA with run.py's defaults; FIFO runs every trial for the whole budget.
    scheduler = (
        ASHAScheduler(
            time_attr="epoch",
            max_t=table.epochs,
            grace_period=STUDY_DEFAULTS["grace_period"],
            reduction_factor=STUDY_DEFAULTS["reduction_factor"],
        )
        if asha
        else FIFOScheduler()
    )
    log = epoch_log()
    tuner = tune.Tuner(
        tune.with_parameters(replay_trial, table=table, pace=args.pace),
        tune_config=tune.TuneConfig(
            metric="val_acc",
            mode="max",
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=args.trials,
            max_concurrent_trials=args.max_concurrent,
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=f"{sampler_name}-{'asha' if asha else 'fifo'}-{seed}", storage_path=storage, callbacks=[log], verbose=0
        ),
    )
    tuner.fit()
    return log.val_acc


def epochs_to_target(val_acc: list[float], target: float) -> float:
    """Epochs spent until the best val_acc so far reaches target; inf when the study never got there."""
    best = np.fmax.accumulate(np.asarray(val_acc, dtype=float))
    reached = np.flatnonzero(best >= target)
    return float(reached[0] + 1) if reached.size else math.inf


def set_study_environment() -> None:
    """run.py's environment for Ray and Tune (auth mode, no auto loggers, quiet), set before Ray is imported."""
    from search.run import QUIET_ENVIRONMENT, RUNTIME_ENVIRONMENT
    from search.study.cluster import auth_environment

    for key, value in {**RUNTIME_ENVIRONMENT, **auth_environment(None), **QUIET_ENVIRONMENT}.items():
        os.environ.setdefault(key, value)


def replay(args: argparse.Namespace) -> None:
    set_study_environment()
    import optuna
    import ray

    from search.study.driver import start_ray

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # Not "Failed to fetch metrics" per trial: Tune reads result.json back, which no logger writes here.
    logging.getLogger("ray.tune").setLevel(logging.ERROR)
    table = CurveTable.read(args.curves, load_space(SPACE_FILE, MODEL))
    targets = table.targets()
    start_ray()  # the project's private Ray on this machine, once for every study
    runs: dict[str, list[list[float]]] = {pair: [] for pair in PAIRS}
    seconds: dict[str, float] = dict.fromkeys(PAIRS, 0.0)
    started = time.time()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-search-efficiency-") as storage:
            for seed in range(args.first_seed, args.first_seed + args.seeds):
                for pair in PAIRS:
                    study_started = time.time()
                    runs[pair].append(run_study(table, pair, seed, args, storage))
                    seconds[pair] += time.time() - study_started
                    spent = runs[pair][-1]
                    reached = ", ".join(f"{epochs_to_target(spent, v):g} ({k})" for k, v in targets.items())
                    print(
                        f"seed {seed:2d}  {pair:13s}  {len(spent):3d} epochs, best {max(spent, default=math.nan):.4f}, "
                        f"within {WITHIN:g} after {reached}  ({time.time() - study_started:.1f} s)",
                        flush=True,
                    )
    finally:
        ray.shutdown()
    wall = time.time() - started
    summaries = {name: summarise(runs, target) for name, target in targets.items()}
    header = describe(table, args, wall, seconds)
    print()
    print("\n".join(header))
    for name, summary in summaries.items():
        print(f"\nTarget: within {WITHIN:g} of the best {name} val_acc ({targets[name] + WITHIN:.4f})")
        print(text_table(SUMMARY_COLUMNS, summary))
    args.markdown.write_text(markdown_report(header, summaries, targets), encoding="utf-8")
    plot(runs, targets, args.plot)
    print(f"\nwrote {args.markdown} and {args.plot}")


# ---------------------------------------------------------------- replay: the numbers


SUMMARY_COLUMNS = (
    "searcher + scheduler",
    "epochs to within 1 point (median)",
    "IQR",
    "seeds that got there",
    "vs random alone (median epochs)",
    "epochs per study (median)",
    "best val_acc found (median)",
    "vs same sampler alone, per seed (fewer/same/more epochs)",
)


def quantile(values: list[float], q: float) -> float:
    """Linear-interpolated quantile where a study that never got there (inf) sorts last and stays inf."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low, high = ordered[math.floor(position)], ordered[math.ceil(position)]
    if math.isinf(high):
        return math.inf
    return low + (high - low) * (position - math.floor(position))


def epochs_text(value: float) -> str:
    return "not reached" if math.isinf(value) else f"{value:.0f}" if value == round(value) else f"{value:.1f}"


def iqr_text(value: float) -> str:
    return "∞" if math.isinf(value) else epochs_text(value)


def summarise(runs: dict[str, list[list[float]]], target: float) -> list[tuple[str, ...]]:
    reached = {pair: [epochs_to_target(spent, target) for spent in studies] for pair, studies in runs.items()}
    baseline = quantile(reached[BASELINE], 0.5)
    rows = []
    for pair, studies in runs.items():
        median = quantile(reached[pair], 0.5)
        ratio = median / baseline if math.isfinite(median) and math.isfinite(baseline) else math.nan
        rows.append(
            (
                pair,
                epochs_text(median),
                f"{iqr_text(quantile(reached[pair], 0.25))}-{iqr_text(quantile(reached[pair], 0.75))}",
                f"{sum(math.isfinite(r) for r in reached[pair])}/{len(studies)}",
                "—" if math.isnan(ratio) else f"{ratio:.2f}x",
                f"{np.median([len(spent) for spent in studies]):.0f}",
                f"{np.median([max(spent) for spent in studies]):.4f}",
                paired_text(reached[pair], reached[WITHOUT_ASHA[pair]]) if pair in WITHOUT_ASHA else "—",
            )
        )
    return rows


def paired_text(with_asha: list[float], without: list[float]) -> str:
    """Seeds where the ASHA study got there in fewer, as many, or more epochs than its partner without ASHA."""
    pairs = list(zip(with_asha, without, strict=True))
    fewer = sum(a < b for a, b in pairs)
    same = sum(a == b for a, b in pairs)
    return f"{fewer}/{same}/{len(pairs) - fewer - same}"


def describe(table: CurveTable, args: argparse.Namespace, wall: float, seconds: dict[str, float]) -> list[str]:
    from search.records.study_config import STUDY_DEFAULTS

    per_study = ", ".join(f"{pair} {total / args.seeds:.1f} s" for pair, total in seconds.items())
    return [
        f"Table: {len(table.configs)} vit configurations x {table.epochs} epochs on the digits at {IMG_SIZE} px; "
        f"recording trained for {table.seconds.sum() / 60:.0f} min on 1 CPU thread.",
        f"Studies: {args.seeds} seeds x {len(PAIRS)} pairs, {args.trials} trials each, {args.max_concurrent} at once; "
        f"ASHA grace period {STUDY_DEFAULTS['grace_period']}, reduction factor {STUDY_DEFAULTS['reduction_factor']}, "
        f"max_t {table.epochs}; random alone is the baseline of the ratios.",
        f"Replay took {wall:.0f} s; per study: {per_study}.",
    ]


def text_table(columns: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    cells = [columns, *rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def markdown_report(header: list[str], summaries: dict[str, list[tuple[str, ...]]], targets: dict[str, float]) -> str:
    lines = [
        "# Search efficiency: epochs to within 1 point of the best",
        "",
        "Made by `python bench/search_efficiency.py replay` (see its docstring); the plot is search_efficiency.png.",
        "",
        *(f"{line}  " for line in header),
    ]
    for name, rows in summaries.items():
        lines += [
            "",
            f"## Target: within {WITHIN:g} of the best {name} val_acc ({targets[name] + WITHIN:.4f})",
            "",
            "| " + " | ".join(SUMMARY_COLUMNS) + " |",
            "|" + "---|" * len(SUMMARY_COLUMNS),
            *("| " + " | ".join(row) + " |" for row in rows),
        ]
    return "\n".join([*lines, ""])


def best_so_far(spent: list[float], length: int) -> np.ndarray:
    """The running best over `length` epochs; a study that ended sooner keeps its best to the end."""
    best = np.fmax.accumulate(np.asarray(spent, dtype=float))
    return np.concatenate([best, np.full(length - len(best), best[-1])])


def plot(runs: dict[str, list[list[float]]], targets: dict[str, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 5))
    for pair, studies in runs.items():
        length = max(len(spent) for spent in studies)
        curves = np.stack([best_so_far(spent, length) for spent in studies])
        epochs = np.arange(1, length + 1)
        low, median, high = np.percentile(curves, [25, 50, 75], axis=0)
        (line,) = axes.plot(epochs, median, label=pair)
        axes.fill_between(epochs, low, high, color=line.get_color(), alpha=0.15)
    for (name, target), style in zip(targets.items(), ("--", ":"), strict=True):
        axes.axhline(target, color="black", linestyle=style, linewidth=1, label=f"best {name} - {WITHIN:g}")
    # The searches differ in their first tens of epochs and near the top: a log axis and the top 0.15 show both.
    axes.set_xscale("log")
    axes.set_ylim(min(targets.values()) - 0.15, max(targets.values()) + 0.03)
    axes.set_xlabel("epochs spent (all trials, in the order Tune received them; log scale)")
    axes.set_ylabel("best val_acc found")
    axes.set_title(f"vit on digits at {IMG_SIZE} px: median over {len(next(iter(runs.values())))} seeds, IQR shaded")
    axes.legend(loc="lower right")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


# ---------------------------------------------------------------- the command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    steps = parser.add_subparsers(dest="step", required=True)
    rec = steps.add_parser(
        "record",
        help="train configurations on the digits, write the curves table",
        formatter_class=parser.formatter_class,
    )
    rec.add_argument("--configs", type=int, default=40, help="configurations drawn from spaces/vit.yaml")
    rec.add_argument("--epochs", type=int, default=8, help="epochs per configuration (ASHA's max_t in the replay)")
    rec.add_argument("--seed", type=int, default=0, help="RandomSampler seed of the draw")
    rec.add_argument("--out", type=Path, default=CURVES_CSV, help="the curves table (CSV)")
    rep = steps.add_parser(
        "replay",
        help="replay the four searcher + scheduler pairs against the table",
        formatter_class=parser.formatter_class,
    )
    rep.add_argument("--seeds", type=int, default=20, help="studies per pair")
    rep.add_argument(
        "--first-seed",
        type=int,
        default=1,
        help="sampler seeds run from here; not record's seed 0, whose RandomSampler (and TPE's start-up trials) "
        "would propose the recorded configurations themselves, in their recorded order",
    )
    rep.add_argument("--trials", type=int, default=30, help="trials per study")
    rep.add_argument("--max-concurrent", type=int, default=2, help="trials at once")
    rep.add_argument("--pace", type=float, default=0.01, help="seconds slept per recorded second of an epoch")
    rep.add_argument("--curves", type=Path, default=CURVES_CSV, help="the curves table (CSV) that record wrote")
    rep.add_argument("--markdown", type=Path, default=REPORT_MD, help="the Markdown table")
    rep.add_argument("--plot", type=Path, default=PLOT_PNG, help="the plot (PNG)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.step == "record":
        record(args.configs, args.epochs, args.seed, args.out)
    else:
        replay(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
