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
from search.records.operating_point import OperatingTarget, parse_operating_point
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
    source.add_argument(
        "--registered",
        metavar="NAME/VERSION",
        help="no retrain: test this registered version (NAME/VERSION, NAME/latest or NAME@ALIAS) on --external "
        "DATA, in a run of its own linked to the version by a tag (external.<digest>)",
    )
    what.add_argument(
        "--trial",
        metavar="LABEL",
        default=None,
        help="with --study: retrain this trial (t07) instead of the best, e.g. a point of a multi-objective "
        "study's Pareto front",
    )
    what.add_argument("--model", default=None, choices=MODEL_NAMES, help="refuse a config that is not for this model")
    what.add_argument(
        "--ensemble",
        metavar="K",
        type=int,
        default=None,
        help="with --study: retrain the study's K (>= 2) best distinct configurations among its trials that "
        "completed their budget (with --confirm, in the confirmation's ranking), each as one model is retrained "
        "and calibrated, and ship the average of their probabilities in one model file; judged against its best "
        "member alone on the same test images (McNemar, paired bootstrap)",
    )
    what.add_argument(
        "--tta",
        action="store_true",
        help="test-time augmentation: average the probabilities over the image and the flips the winner trained "
        "with (hflip, vflip > 0), in the test, the model file, the registered model and the export; judged "
        "against no flips; costs one forward pass per flip more",
    )

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
    data.add_argument(
        "--external",
        metavar="DATA",
        default=None,
        help="another site's images of the model's classes (class folders, a manifest, or synthetic[:C]): tested "
        "whole after the retrain, as the test split is, at the temperature fitted on val; a source without some "
        "of the classes is tested too, one with a class the model lacks is refused",
    )
    data.add_argument(
        "--positive",
        metavar="CLASS",
        default=None,
        help="the class whose sensitivity and specificity are reported (and thresholded, with --operating-point); "
        "default: with two classes the second, with more the macro mean of one-vs-rest",
    )
    data.add_argument(
        "--operating-point",
        metavar="TARGET=VALUE",
        default=None,
        help="choose a decision threshold on the --positive class's calibrated probability on the val split "
        "(never the test): sensitivity=0.95 (the highest threshold that flags at least 95 %% of val's positives) or "
        "specificity=0.9 (the lowest that leaves at least 90 %% of the others unflagged); reported on the test "
        "with intervals, stored in model.pt and applied by predict.py (a flagged column). Implies --keep-val",
    )

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
    problems += ensemble_problems(args)
    problems += operating_point_problems(args)
    problems += registered_problems(args)
    missing = missing_packages(args.export)  # now, not after an hour of training
    if missing:
        problems.append(missing)
    if problems:
        raise UsageError("; ".join(problems))


RETRAIN_ONLY = {
    "trial": "--trial",
    "model": "--model",
    "epochs": "--epochs",
    "keep_val": "--keep-val",
    "seed": "--seed",
    "weights": "--weights",
    "data": "--data",
    "positive": "--positive",
    "operating_point": "--operating-point",
    "experiment": "--experiment",
    "register_name": "--register-name",
    "export": "--export",
    "ensemble": "--ensemble",
    "tta": "--tta",
}
"""Flags that say how to retrain (dest -> flag): meaningless for --registered, which tests a model as it is."""


def registered_problems(args: argparse.Namespace) -> list[str]:
    """--registered's name, the --external it needs, and the retrain's flags it takes none of."""
    if args.registered is None:
        return []
    from search.tracking.registered import registered_model  # the standard library only: no MLflow yet

    problems = []
    if registered_model(args.registered) is None:
        problems.append(
            f"--registered {args.registered}: write NAME/VERSION, NAME/latest or NAME@ALIAS, e.g. cnn-classifier/3"
        )
    if args.external is None:
        problems.append(
            f"--registered {args.registered} tests a registered model on other images: give --external DATA"
        )
    given = [flag for dest, flag in RETRAIN_ONLY.items() if getattr(args, dest, None) not in (None, False, [])]
    if given:
        problems.append(
            f"{', '.join(given)}: a retrain's flag(s); --registered tests the registered model as it is (its "
            f"classes, image size, temperature and operating point)"
        )
    return problems


def ensemble_problems(args: argparse.Namespace) -> list[str]:
    """--ensemble's K and where its members come from (one study), and the flags they do not take yet."""
    problems = []
    if args.ensemble is not None:
        if args.ensemble < 2:
            problems.append(f"--ensemble {args.ensemble}: an ensemble has at least 2 members (give K >= 2)")
        others = [flag for flag, value in (("--config", args.config), ("--run-id", args.run_id)) if value]
        if args.trial is not None:
            others.append("--trial")
        if others:
            problems.append(
                f"--ensemble {args.ensemble} retrains one study's best configurations: give --study NAME, not "
                f"{', '.join(others)}"
            )
    if (args.ensemble is not None or args.tta) and args.external is not None:
        flags = " and ".join(
            flag for flag, on in (("--ensemble", args.ensemble is not None), ("--tta", args.tta)) if on
        )
        problems.append(f"{flags} with --external: not supported; retrain without --external")
    return problems


def operating_point_problems(args: argparse.Namespace) -> list[str]:
    """--operating-point's syntax and range, and the --positive class it needs."""
    if args.operating_point is None:
        return []
    try:
        target = parse_operating_point(args.operating_point)
    except ValueError as error:
        return [str(error)]
    if args.positive is None:
        return [f"--operating-point {target} needs --positive CLASS: the class whose probability is thresholded"]
    return []


def operating_target(args: argparse.Namespace) -> OperatingTarget | None:
    """--operating-point as its record (check_arguments has checked it)."""
    return None if args.operating_point is None else parse_operating_point(args.operating_point)


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


def load_members(args: argparse.Namespace) -> list[Winner]:
    """The configuration to retrain; with --ensemble K, the study's K best distinct ones, its winner first."""
    if args.ensemble is None:
        return [load_winner(args)]
    from search.final_model.ensemble import study_members

    return study_members(args.tracking_uri, args.study, args.ensemble, args.model)


def test_time_flips(args: argparse.Namespace, winner: Winner) -> tuple[str, ...]:
    """--tta's flips: those the winner trained with; none (and a note) where it trained with neither."""
    from search.final_model.ensemble import trained_flips

    flips = trained_flips(winner.hyperparameters.to_dict()) if args.tta else ()
    if args.tta and not flips:
        print(
            f"note: --tta changes nothing: {winner.trial_or_id} trained with hflip = vflip = 0, so there is no flip "
            "to average over; left off"
        )
    return flips


def retrain_request(args: argparse.Namespace) -> RetrainRequest:
    """The flags that say how to retrain, as the record prepare_final takes (compare.py fills one of its own)."""
    return RetrainRequest(
        tracking_uri=args.tracking_uri,
        cache_dir=args.cache_dir,
        data=args.data,
        weights=weights_files(args.weights),
        no_pretrained=args.no_pretrained,
        keep_val=args.keep_val or args.operating_point is not None,  # the threshold is chosen on val
        epochs=args.epochs,
        seed=args.seed,
        config_file=args.config,
        experiment=args.experiment,
        register_name=args.register_name,
        out=args.out,
        export=args.export,
        positive=args.positive,
        operating_point=operating_target(args),
        external=args.external,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_arguments(args)
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # our bars only
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # our closing lines say where
        if args.registered is not None:
            return test_registered(args)
        members = load_members(args)  # before torch loads: a wrong name or file is answered sooner
        from search.final_model.retrain import execute_final, prepare_members  # torch, timm, MLflow

        prepared = prepare_members(retrain_request(args), members, test_time_flips(args, members[0]))
        if args.operating_point is not None and not args.keep_val:
            print(
                "note: --operating-point implies --keep-val: the model trains on train only, early-stops and is "
                "calibrated on val, where the threshold is chosen"
            )
    except UsageError as error:
        print(f"search/final.py: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nstopped before training: nothing was written to MLflow")
        return 130
    return execute_final(prepared)


def test_registered(args: argparse.Namespace) -> int:
    """--registered NAME/VERSION --external DATA: the version's model.pt tested on DATA, no retrain (a UsageError
    before anything is written; the caller answers it)."""
    from search.final_model.external import execute_registered, prepare_registered  # torch, MLflow
    from search.tracking.registered import registered_model

    model = registered_model(args.registered)
    assert model is not None and args.external is not None  # check_arguments said so
    prepared = prepare_registered(model, args.external, args.tracking_uri, args.cache_dir, args.out)
    return execute_registered(prepared)


if __name__ == "__main__":
    sys.exit(main())
