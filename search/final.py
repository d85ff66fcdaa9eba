"""Retrain the winner of a study on train+val, test it once, register it.

    python search/final.py --study <name>

The config comes from a study (its best trial), one trial run, or a best_config.yaml.
Training runs through the search's own engine (trainables.engine.fit); the test
split is the one the study held out and never read. Only the standard library is
imported until the arguments are valid, so --help and argument errors answer at once.
"""

from __future__ import annotations

import argparse
import os
import sys

from search.cli import (
    DEFAULT_CACHE_DIR,
    DEFAULT_TRACKING_URI,
    DefaultsFormatter,
    OneLineParser,
    add_weights_argument,
    weights_files,
    weights_problems,
)
from search.errors import UsageError
from search.final_model.export import EXPORT_FORMATS, missing_packages
from search.records.retrain import RetrainRequest
from search.records.winner import Winner, WinnerRefused, load_file
from trainables.config import MODEL_NAMES


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="search/final.py",
        description="Retrain a study's best configuration on train+val with the search's engine, evaluate it once "
        "on the test split the search never saw, log it to MLflow and register the model.",
        formatter_class=DefaultsFormatter,
    )
    what = parser.add_argument_group("which configuration (one of)")
    source = what.add_mutually_exclusive_group(required=True)
    source.add_argument("--study", metavar="NAME", help="a study's name (run.py --name): its best trial's config")
    source.add_argument("--run-id", metavar="ID", help="one trial's MLflow run id (or a study's parent run id)")
    source.add_argument(
        "--config", metavar="FILE", help="a best_config.yaml, as a study writes it (ray_results/<study>/best/)"
    )
    what.add_argument(
        "--trial",
        metavar="LABEL",
        default=None,
        help="with --study: retrain this trial (t07) instead of the best, e.g. a point of a multi-objective "
        "study's Pareto front",
    )
    what.add_argument("--model", default=None, choices=MODEL_NAMES, help="refuse a config that is not for this model")

    training = parser.add_argument_group("training")
    training.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="epochs to train (default: as many as the best trial needed; with --keep-val: the study's budget)",
    )
    training.add_argument(
        "--keep-val",
        action="store_true",
        help="train on train only and early-stop on val (keeping the best epoch), instead of train+val; "
        "then calibrate: fit a temperature on val (never the test) so the probabilities mean what they say. "
        "Without it the model trains on val and stays uncalibrated (temperature 1)",
    )
    training.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seeds weight init, batch order and augmentation (default: the study's seed); "
        "the split is always the study's own (its split.json), so the test images stay unseen",
    )
    training.add_argument(
        "--no-pretrained",
        action="store_true",
        help="random initialisation instead of timm's pretrained weights (a study run with "
        "--no-pretrained retrains without them too)",
    )
    add_weights_argument(training)

    data = parser.add_argument_group("data")
    data.add_argument(
        "--data", default=None, help="data source (default: the study's); its classes must be the study's"
    )
    data.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR, help="decoded-image cache (shared with run.py)")

    results = parser.add_argument_group("where results go")
    results.add_argument("--tracking-uri", default=DEFAULT_TRACKING_URI, help="MLflow tracking store")
    results.add_argument(
        "--experiment", default=None, help="MLflow experiment (default: the study's; else the model name)"
    )
    results.add_argument("--register-name", default=None, help="registered model name (default: <model>-classifier)")
    results.add_argument(
        "--out",
        default=None,
        help="local folder for weights, config, classes and metrics (default: final/<study>-<timestamp>)",
    )
    results.add_argument(
        "--export",
        default=None,
        choices=EXPORT_FORMATS,
        help="also write the model in this format into --out: onnx writes model.onnx (float32 images "
        "(N, 3, H, W) in [0, 1] -> class probabilities, as the registered model), checked against PyTorch "
        'on the test images; needs pip install "hpo-classifiers[export]"',
    )
    return parser


def check_arguments(args: argparse.Namespace) -> None:
    """Every problem found without loading anything heavy, reported at once."""
    problems = []
    if args.trial is not None and args.study is None:
        problems.append(f"--trial {args.trial} names a trial of a study: give --study NAME too")
    if args.epochs is not None and args.epochs < 1:
        problems.append(f"--epochs {args.epochs}: train at least 1 epoch")
    if args.register_name is not None and not args.register_name.strip():
        problems.append("--register-name is empty: give a name, e.g. vit-classifier")
    problems += weights_problems(args.weights)
    missing = missing_packages(args.export)  # now, not after an hour of training
    if missing:
        problems.append(missing)
    if problems:
        raise UsageError("; ".join(problems))


def load_winner(args: argparse.Namespace) -> Winner:
    """--config FILE is read without MLflow; --study and --run-id need it."""
    if args.config is not None:
        try:
            return load_file(args.config, args.model)
        except WinnerRefused as error:
            raise UsageError(str(error)) from None
    from search.final_model.sources import winner_from_mlflow

    return winner_from_mlflow(
        args.tracking_uri, study=args.study, trial=args.trial, run_id=args.run_id, model=args.model
    )


def retrain_request(args: argparse.Namespace) -> RetrainRequest:
    """The flags that say how to retrain, as the record prepare_final takes (compare.py fills one of its own)."""
    return RetrainRequest(
        tracking_uri=args.tracking_uri,
        cache_dir=args.cache_dir,
        data=args.data,
        weights=weights_files(args.weights),
        no_pretrained=args.no_pretrained,
        keep_val=args.keep_val,
        epochs=args.epochs,
        seed=args.seed,
        config_file=args.config,
        experiment=args.experiment,
        register_name=args.register_name,
        out=args.out,
        export=args.export,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_arguments(args)
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # our bars only
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # our closing lines say where
        config = load_winner(args)  # before torch loads: a wrong name or file is answered sooner
        from search.final_model.retrain import execute_final, prepare_final  # torch, timm, MLflow

        prepared = prepare_final(retrain_request(args), config)
    except UsageError as error:
        print(f"search/final.py: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nstopped before training: nothing was written to MLflow")
        return 130
    return execute_final(prepared)


if __name__ == "__main__":
    sys.exit(main())
