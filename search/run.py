"""Search hyperparameters for one of the three classifiers.

    python search/run.py --model cnn --trials 30 --data path/to/images

Only the standard library is imported until the arguments are valid, so --help
and argument errors answer at once; Ray, torch and timm load afterwards.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

from search.cli import DEFAULT_TRACKING_URI, MODELS, DefaultsFormatter, OneLineParser, add_weights_argument, weights_problems
from search.errors import UsageError

METRICS = ("val_acc", "val_loss", "val_balanced_acc", "val_macro_f1")  # = trainables.config.METRIC_MODES
MIN_IMG_SIZE, MAX_IMG_SIZE = 16, 1024
"""1024 px is already 3 MB of cache per image and 4,096 ViT tokens; these models were made for 224."""
MAX_NAME_LENGTH = 100
STUDY_NAME = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,{MAX_NAME_LENGTH - 1}}}")
"""A study's name is a folder under --storage-path and a value in MLflow filters: nothing that escapes either."""


def gpu_fraction(value: str) -> float | str:
    if value == "auto":
        return value
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is neither a number nor 'auto'") from None


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="search/run.py",
        description="Find the best hyperparameters for one lightweight image classifier: "
        "Optuna TPE proposes, ASHA stops weak trials, MLflow records everything.",
        formatter_class=DefaultsFormatter,
    )
    what = parser.add_argument_group("what to search")
    what.add_argument("--model", required=True, choices=MODELS, help="cnn: tf_efficientnetv2_s; vit: vit_tiny_patch16_224; hybrid: both")
    what.add_argument("--trials", type=int, default=30, help="number of trials")
    what.add_argument("--data", default="data", help="a folder with one sub-folder per class (split 70/15/15), "
                      "a folder with train/ val/ test/, or 'synthetic' (built-in, 11 classes; 'synthetic:C' for C)")
    what.add_argument("--space", default=None, help="search-space YAML (default: spaces/<model>.yaml)")
    what.add_argument("--metric", default="val_acc", choices=METRICS, help="what the search optimises (val_loss is minimised)")
    what.add_argument("--seed", type=int, default=0, help="seeds the split, the TPE sampler and every trial")

    training = parser.add_argument_group("training")
    training.add_argument("--epochs", type=int, default=None, help="epoch budget per trial (default 15; 3 with --smoke)")
    training.add_argument("--img-size", type=int, default=None, help="square image size (default 224; 32 with --smoke)")
    training.add_argument("--no-pretrained", action="store_true", help="random initialisation instead of timm's pretrained weights")
    add_weights_argument(training)
    training.add_argument("--smoke", action="store_true", help="CPU-friendly profile: 32 px, 3 epochs, 24 training images per class")

    speed = parser.add_argument_group("speed on CUDA (ignored on the CPU)")
    speed.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True, help="fp16 autocast with GradScaler")
    speed.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True, help="NHWC memory layout")
    speed.add_argument("--cudnn-benchmark", action=argparse.BooleanOptionalAction, default=True, help="autotune convolutions once")
    speed.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                       help="torch.compile each trial's model (its compile time is paid again in every trial)")

    resources = parser.add_argument_group("resources and early stopping")
    resources.add_argument("--gpus-per-trial", type=gpu_fraction, default="auto", metavar="F|auto",
                           help="GPU share per trial, 0 for the CPU; 'auto' measures one training step of the largest "
                           "configuration and packs as many trials as fit in free memory (0 without a GPU)")
    resources.add_argument("--cpus-per-trial", type=int, default=1, help="CPU cores per trial")
    resources.add_argument("--max-concurrent", type=int, default=None, help="most trials at once (default: as many as resources allow)")
    resources.add_argument("--max-failures", type=int, default=0, help="retries of a crashed trial from its last checkpoint")
    resources.add_argument("--grace-period", type=int, default=2, help="ASHA: epochs every trial gets before it can be stopped")
    resources.add_argument("--reduction-factor", type=int, default=3, help="ASHA: keep the top 1/N at each rung")

    tracking = parser.add_argument_group("where results go")
    tracking.add_argument("--name", default=None, help="study name (default: <model>-<timestamp>)")
    tracking.add_argument("--storage-path", default="ray_results", help="Ray Tune trial folders and checkpoints")
    tracking.add_argument("--cache-dir", default=".cache/images", help="decoded-image cache shared by trials")
    tracking.add_argument("--tracking-uri", default=DEFAULT_TRACKING_URI, help="MLflow tracking store")
    tracking.add_argument("--experiment", default=None, help="MLflow experiment (default: the model name)")
    tracking.add_argument("--resume", action="store_true", help="continue the interrupted study --name with its own settings")
    return parser


def check_arguments(args: argparse.Namespace) -> None:
    """Every problem found without loading anything heavy, reported at once."""
    problems = []
    if args.trials < 1:
        problems.append(f"--trials {args.trials}: run at least 1 trial")
    if args.epochs is not None and args.epochs < 1:
        problems.append(f"--epochs {args.epochs}: train at least 1 epoch")
    if args.img_size is not None and not MIN_IMG_SIZE <= args.img_size <= MAX_IMG_SIZE:
        problems.append(f"--img-size {args.img_size}: use {MIN_IMG_SIZE} to {MAX_IMG_SIZE} (224 is standard)")
    if args.name is not None and not STUDY_NAME.fullmatch(args.name):
        problems.append(f"--name {args.name!r}: use 1 to {MAX_NAME_LENGTH} letters, digits, '.', '_' or '-', "
                        f"starting with a letter or digit (it names a folder and an MLflow run)")
    if isinstance(args.gpus_per_trial, float) and not 0 <= args.gpus_per_trial <= 1:
        problems.append(f"--gpus-per-trial {args.gpus_per_trial}: give a fraction in (0, 1], or 0 for CPU")
    if args.cpus_per_trial < 1:
        problems.append(f"--cpus-per-trial {args.cpus_per_trial}: give at least 1")
    if args.max_concurrent is not None and args.max_concurrent < 1:
        problems.append(f"--max-concurrent {args.max_concurrent}: give at least 1")
    if args.max_failures < 0:
        problems.append(f"--max-failures {args.max_failures}: give 0 or more")
    if args.grace_period < 1 or args.reduction_factor < 2:
        problems.append("ASHA needs --grace-period >= 1 and --reduction-factor >= 2")
    problems += weights_problems(args.weights)
    if problems:
        raise UsageError("; ".join(problems))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_arguments(args)
        return run_study(args)
    except UsageError as error:
        print(f"search/run.py: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before the study started: nothing was written
        print("search/run.py: interrupted", file=sys.stderr)
        return 130


def run_study(args: argparse.Namespace) -> int:
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")  # MLflow is the record
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    from search.launch import execute_study, prepare_study

    return execute_study(prepare_study(args))


if __name__ == "__main__":
    sys.exit(main())
