"""Does an ensemble pay? The single best configuration against an ensemble of 3, with and without test-time flips.

    python bench/ensemble.py [--model vit] [--trials 10] [--epochs 6] [--workdir DIR] [--out bench/ensemble.md]

On scikit-learn's digits (1,797 8x8 grey digits, 10 classes, written as PNG class folders by
search_efficiency.write_digits_folder) at 32 px from random init: one small study (run.py, one trial at a time,
no ASHA pruning so every trial completes its budget and is a candidate member), then final.py three ways on the
study's own split, each with --keep-val (trained on train, early-stopped and calibrated on val):

    single    final.py --study S --keep-val                      (the best configuration)
    ensemble  final.py --study S --keep-val --ensemble 3         (the 3 best distinct configurations)
    tta       final.py --study S --keep-val --ensemble 3 --tta   (and the flips the winner trained with)

Printed side by side: test accuracy and ECE with final.py's own 95 % bootstrap intervals, each arm against the single
best on the same test images (McNemar's exact test and the paired bootstrap interval of the accuracy difference,
search.evaluation's), and the cost: forward passes per image, latency per image at batch 1 (trainables.costs'
inference_latency through the scoring network, as compare.py measures), parameters (the members' sum) and training
compute in recipe trainings (each member's trained epochs over the study's --epochs, plus the search's
compute_vs_recipe). A benchmark: it measures and prints, never asserts. The study is reused from --workdir when it
has finished there, so a rerun times only the retrains (the study's own wall time is read back from MLflow).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: the project's packages import

from bench.common import machine_info  # noqa: E402
from bench.search_efficiency import write_digits_folder  # noqa: E402

IMG_SIZE = 32
SEED = 0
STUDY = "bench-ensemble"
K = 3
RESAMPLES = 2000
ARMS = {
    "single": [],
    f"ensemble of {K}": ["--ensemble", str(K)],
    f"ensemble of {K} + TTA": ["--ensemble", str(K), "--tta"],
}
"""Each arm's final.py flags on top of --study S --keep-val."""


@dataclass(frozen=True)
class Workspace:
    """Where the benchmark keeps its data, stores and results (one folder: nothing lands in the project)."""

    root: Path

    @property
    def digits(self) -> Path:
        return self.root / "digits"

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.root / 'mlflow.db'}"

    def store_flags(self) -> list[str]:
        return [
            "--tracking-uri",
            self.tracking_uri,
            "--cache-dir",
            str(self.root / "cache"),
        ]


# ---------------------------------------------------------------- the study


def child_cpu_seconds() -> float:
    """User + system CPU seconds of the finished child processes so far (the study's Ray workers included)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_logged(command: list[str], log: Path) -> tuple[float, float]:
    """Run one of the project's scripts, its output into `log`; (wall seconds, CPU seconds). A failure stops here."""
    cpu, start = child_cpu_seconds(), time.perf_counter()
    one_thread = {**os.environ, "OMP_NUM_THREADS": "1"}  # as a trial trains (one core): the machine stays usable
    with log.open("w") as output:
        code = subprocess.call(command, stdout=output, stderr=subprocess.STDOUT, cwd=ROOT, env=one_thread)
    wall = time.perf_counter() - start
    if code != 0:
        tail = "\n".join(log.read_text().splitlines()[-15:])
        raise SystemExit(f"{' '.join(command[1:3])} failed (exit {code}); the end of {log}:\n{tail}")
    return wall, child_cpu_seconds() - cpu


def study_finished(space: Workspace) -> bool:
    from search.tracking.schema import store_exists
    from search.tracking.study_run import find_study

    if not store_exists(space.tracking_uri):
        return False
    parent = find_study(space.tracking_uri, STUDY)
    return parent is not None and parent.info.status == "FINISHED"


def run_study(space: Workspace, model: str, trials: int, epochs: int) -> dict[str, float]:
    """The study, unless --workdir holds it finished already; its wall time and compute in recipe trainings, as its
    run recorded them."""
    if not study_finished(space):
        if not space.digits.exists():
            write_digits_folder(space.digits)
        command = [
            sys.executable,
            "search/run.py",
            "--model",
            model,
            "--name",
            STUDY,
            "--data",
            str(space.digits),
            "--trials",
            str(trials),
            "--epochs",
            str(epochs),
            "--grace-period",
            str(epochs),  # no pruning: every trial completes its budget and can be a member
            "--img-size",
            str(IMG_SIZE),
            "--no-pretrained",
            "--seed",
            str(SEED),
            "--max-concurrent",
            "1",
            "--cpus-per-trial",
            "1",
            "--gpus-per-trial",
            "0",
            "--storage-path",
            str(space.root / "ray_results"),
            *space.store_flags(),
        ]
        print(f"study: {' '.join(command[1:])}", flush=True)
        run_logged(command, space.root / "study.log")  # its CPU time is Ray's workers', not a child's: not counted
    else:
        print(f"study: reusing {STUDY} in {space.root}", flush=True)
    return study_metrics(space)


def study_metrics(space: Workspace) -> dict[str, float]:
    from search.tracking.schema import COMPUTE_VS_RECIPE, ELAPSED_METRIC
    from search.tracking.study_run import find_study

    parent = find_study(space.tracking_uri, STUDY)
    assert parent is not None
    metrics = parent.data.metrics
    return {
        "wall_s": metrics.get(ELAPSED_METRIC, float("nan")),
        "compute_vs_recipe": metrics.get(COMPUTE_VS_RECIPE, float("nan")),
    }


# ---------------------------------------------------------------- final.py three ways


@dataclass(frozen=True)
class Arm:
    """One final.py run of the study's configurations, as it finished, and what it measured."""

    name: str
    out: Path
    wall_s: float
    cpu_s: float
    epochs_run: int
    """Epochs trained by all its networks together (early stopping on val may end one before its budget)."""


def run_final(space: Workspace, name: str, flags: list[str]) -> Arm:
    """final.py --study S --keep-val (and the arm's flags), into a folder of its own; a finished one is reused."""
    out = space.root / ("final-" + name.replace(" ", "-").replace("+", "").replace("--", "-"))
    log = out.with_suffix(".log")
    if not (out / "metrics.json").exists():
        command = [sys.executable, "search/final.py", "--study", STUDY, "--keep-val", "--no-pretrained"]
        command += [*flags, "--out", str(out), *space.store_flags()]
        print(f"{name}: {' '.join(command[1:])}", flush=True)
        wall, cpu = run_logged(command, log)
        (out / "bench_times.json").write_text(json.dumps({"wall_s": wall, "cpu_s": cpu}))
    else:
        print(f"{name}: reusing {out}", flush=True)
    times = json.loads((out / "bench_times.json").read_text())
    return Arm(name, out, times["wall_s"], times["cpu_s"], epochs_run(log))


def epochs_run(log: Path) -> int:
    """The epochs final.py trained, counted from its log's epoch lines ('epoch 3/6  train_loss ...'): every
    member's, each line one epoch of one network."""
    return sum(1 for line in log.read_text().splitlines() if re.match(r"\s*epoch \d+/\d+ ", line))


NO_FLIPS = (
    "the winner trained with hflip = vflip = 0 (a flipped digit is another digit or none), so --tta has no flip to "
    "average over and final.py leaves it off: the arm would retrain the ensemble again, to the same numbers"
)


def winner_flips(single: Arm) -> tuple[str, ...]:
    """The flips the study's winner trained with: what --tta would average over (final.py's own rule)."""
    from search.final_model.ensemble import trained_flips
    from trainables.checkpoint import ModelFile

    return trained_flips(ModelFile.load(single.out / "model.pt").hyperparameters.to_dict())


# ---------------------------------------------------------------- measured


@dataclass(frozen=True)
class Measured:
    arm: Arm
    accuracy: tuple[float, float, float]
    """Test accuracy with final.py's 95 % bootstrap interval."""
    ece: tuple[float, float, float]
    passes: int
    latency_ms: float
    parameters: int


def measure(arm: Arm) -> Measured:
    """The arm's test scores as final.py recorded them, and its model file's cost, measured here."""

    from trainables.checkpoint import ModelFile
    from trainables.models import count_parameters
    from trainables.scoring import forward_passes, scoring_network

    record = json.loads((arm.out / "metrics.json").read_text())
    test, intervals = record["test"], record["intervals"]
    model_file = ModelFile.load(arm.out / "model.pt")
    scoring = scoring_network(model_file)
    latency = quiet_latency(scoring, model_file.spec.img_size)
    return Measured(
        arm,
        (test["test_acc"], *intervals["test_acc"]),
        (test["test_ece"], *intervals["test_ece"]),
        forward_passes(model_file),
        latency,
        count_parameters(scoring),
    )


def quiet_latency(scoring, img_size: int, rounds: int = 3) -> float:
    """Milliseconds per image at batch 1 on the CPU (one thread): the least of `rounds` medians of 10 timed passes,
    so that another process's burst on the shared machine is not taken for the model's cost."""
    import torch

    from trainables.config import SpeedOptions
    from trainables.costs import inference_latency

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return min(
            inference_latency(scoring, 1, img_size, torch.device("cpu"), SpeedOptions(), warmup=3, repeats=10)
            for _ in range(rounds)
        )
    finally:
        torch.set_num_threads(threads)


def paired_against(single: Measured, other: Measured) -> str:
    """other - single in accuracy on the same test images: '+1.2 points [-0.4, 2.9], p = 0.21 (not significant)'."""
    from search.evaluation.predictions import PREDICTIONS_FILE, read_predictions

    return paired_text(read_predictions((other.arm.out / PREDICTIONS_FILE).read_text(), other.arm.name), single)


def paired_text(other, single: Measured) -> str:
    """`other` (Predictions) against the single best's on the same images, as paired_against says it."""
    from search.evaluation.formatting import bounds, p_text, points
    from search.evaluation.intervals import stratified_resamples
    from search.evaluation.paired import paired_test
    from search.evaluation.predictions import PREDICTIONS_FILE, read_predictions

    b = read_predictions((single.arm.out / PREDICTIONS_FILE).read_text(), single.arm.name)
    pair = paired_test("other", other, single.arm.name, b, stratified_resamples(b.labels, RESAMPLES, SEED))
    verdict = "significant" if pair.significant else "not significant"
    return (
        f"{points(pair.difference.value, sign=True)} points {bounds(pair.difference)}, {p_text(pair.p_value)} "
        f"({verdict}; {pair.a_only} vs {pair.b_only} images only one gets right)"
    )


# ---------------------------------------------------------------- a flip final.py would not average


FORCED = "ensemble of 3 + hflip TTA, forced"
FORCED_NOTE = (
    "the ensemble's model file with its tta set to ('hflip',) by hand, scored on the same test images (no "
    "training; intervals by search.evaluation.intervals.metric_intervals, as compare.py draws them): what --tta "
    "would cost and do here had the winner trained with hflip"
)


def forced_flip_row(space: Workspace, ensemble: Measured, single: Measured) -> tuple[str, ...] | None:
    """What averaging over the left-right flip would have done, had final.py not left it off: the ensemble's own
    model file with tta=('hflip',), scored on the same test images. None where the test images cannot be matched to
    final.py's, image for image."""
    from dataclasses import replace

    import numpy as np
    import torch

    from search.evaluation.intervals import metric_intervals, stratified_resamples
    from search.evaluation.predictions import PREDICTIONS_FILE, Predictions, read_predictions
    from trainables.checkpoint import ModelFile
    from trainables.data import cache_split, index_source
    from trainables.scoring import forward_passes, scoring_network

    tested = read_predictions((ensemble.arm.out / PREDICTIONS_FILE).read_text(), ensemble.arm.name)
    index = index_source(space.digits, SEED)
    if [sample.key for sample in index.splits["test"]] != list(tested.keys):
        return None
    images = cache_split(index, "test", IMG_SIZE, space.root / "cache").images()
    flipped = replace(ModelFile.load(ensemble.arm.out / "model.pt"), tta=("hflip",))
    scoring = scoring_network(flipped)
    with torch.inference_mode():
        batch = torch.from_numpy(np.array(images)).permute(0, 3, 1, 2).float() / 255
        probabilities = scoring(batch).double().numpy()
    forced = Predictions(tested.keys, tested.labels, probabilities, tested.classes)
    scores = metric_intervals(forced, stratified_resamples(tested.labels, RESAMPLES, SEED))
    latency = quiet_latency(scoring, IMG_SIZE)
    accuracy, ece = scores["test_acc"], scores["test_ece"]
    return (
        FORCED,
        with_interval((accuracy.value, accuracy.low, accuracy.high), 100, 1),
        with_interval((ece.value, ece.low, ece.high), 1, 3),
        paired_text(forced, single),
        str(forward_passes(flipped)),
        f"{latency:.2f}",
        f"{ensemble.parameters / 1e6:.2f} M",
        "as the ensemble's",
        "no training",
    )


# ---------------------------------------------------------------- the table


def with_interval(value: tuple[float, float, float], scale: float, digits: int) -> str:
    v, low, high = (scale * x for x in value)
    return f"{v:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def rows(measured: list[Measured], study: dict[str, float], recipe_epochs: int) -> list[tuple[str, ...]]:
    single = measured[0]
    table = []
    for m in measured:
        retrain = m.arm.epochs_run / recipe_epochs
        table.append(
            (
                m.arm.name,
                with_interval(m.accuracy, 100, 1),
                with_interval(m.ece, 1, 3),
                "-" if m is single else paired_against(single, m),
                str(m.passes),
                f"{m.latency_ms:.2f}",
                f"{m.parameters / 1e6:.2f} M",
                f"{retrain:.1f} + {study['compute_vs_recipe']:.1f} = {retrain + study['compute_vs_recipe']:.1f}",
                f"{m.arm.wall_s:.0f} s / {m.arm.cpu_s / 60:.1f} CPU-min",
            )
        )
    return table


COLUMNS = (
    "arm",
    "test accuracy (%), 95 % CI",
    "ECE, 95 % CI",
    "accuracy vs single (paired bootstrap, McNemar)",
    "forward passes / image",
    "latency / image, batch 1 (ms)",
    "parameters",
    "training compute, recipe trainings (retrain + search)",
    "final.py wall / CPU",
)


def markdown_table(table: list[tuple[str, ...]]) -> list[str]:
    return [
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
        *("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in table),
    ]


def members_line(arm: Arm) -> str:
    record = json.loads((arm.out / "metrics.json").read_text())
    ensemble = record.get("ensemble")
    if not ensemble:
        return ""
    members = ", ".join(
        f"{m['label']} {100 * m['test_acc']:.1f} % [{100 * m['test_acc_ci'][0]:.1f}, {100 * m['test_acc_ci'][1]:.1f}]"
        for m in ensemble["members"]
    )
    tta = record.get("tta")
    flips = f"; flips {', '.join(tta['flips'])}" if tta else ""
    return f"- {arm.name}: members alone {members}{flips}"


def report(
    measured: list[Measured],
    study: dict[str, float],
    args: argparse.Namespace,
    started: float,
    extra: list[tuple[str, ...]],
) -> list[str]:
    import torch

    info = machine_info("cpu")
    table = rows(measured, study, args.epochs) + extra
    lines = [
        "# Ensemble benchmark: the single best against an ensemble of 3, with and without test-time flips",
        "",
        f"`python bench/ensemble.py --model {args.model} --trials {args.trials} --epochs {args.epochs}` on "
        f"{info['cpu']} ({info['cores']} cores, shared), torch {torch.__version__}, {info['date']}, load average "
        f"{info.get('load average', 'n/a')} at the end.",
        "",
        f"scikit-learn's digits (10 classes) at {IMG_SIZE} px from random init, split 70/15/15 by the study (seed "
        f"{SEED}); a {args.model} study of {args.trials} trials x {args.epochs} epochs, one at a time, no pruning "
        f"(search: {study['wall_s']:.0f} s wall, {study['compute_vs_recipe']:.1f} recipe trainings). Each arm is "
        "final.py --study S --keep-val (trained on train, early-stopped and calibrated on val, tested once on the "
        "test split); the intervals are final.py's own (2000 stratified bootstrap resamples), the paired judgement "
        "search.evaluation.paired's; latency is per image at batch 1, through the model file's scoring "
        "network on the CPU, one thread (the least of 3 medians of 10).",
        "",
        *markdown_table(table),
        "",
        *[line for line in (members_line(m.arm) for m in measured) if line],
        "",
        f"This run of the benchmark: {time.perf_counter() - started:.0f} s wall (the study's included where it ran "
        f"here), final.py's CPU time {sum(m.arm.cpu_s for m in measured) / 60:.1f} minutes.",
    ]
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vit", choices=("cnn", "vit", "hybrid"))
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--workdir", default=None, help="keep the data, stores and results here (default: a temp dir)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "ensemble.md"), help="where the log is written")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ensemble-bench-") as scratch:
        space = Workspace(Path(args.workdir or scratch).resolve())
        space.root.mkdir(parents=True, exist_ok=True)
        study = run_study(space, args.model, args.trials, args.epochs)
        arms = []
        for name, flags in ARMS.items():
            if "--tta" in flags and not winner_flips(arms[0]):
                print(f"{name}: not run, {NO_FLIPS}", flush=True)
                continue
            arms.append(run_final(space, name, flags))
        measured = [measure(arm) for arm in arms]
        forced = forced_flip_row(space, measured[1], measured[0]) if len(arms) < len(ARMS) else None
        lines = report(measured, study, args, started, [forced] if forced else [])
        if len(arms) < len(ARMS):
            lines.insert(-2, f"- {list(ARMS)[-1]}: not run: {NO_FLIPS}.")
            if forced:
                lines.insert(-2, f"- {FORCED}: {FORCED_NOTE}.")
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
