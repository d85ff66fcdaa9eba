"""Predict the classes of new images with a registered or local model; explain them on request.

    python search/predict.py --model models:/cnn-classifier/3 --images DIR --out predictions.csv

The model is rebuilt from its model file (final.py's model.pt, which a registered
version carries), with the temperature final.py fitted: the CSV's probabilities are
calibrated, and for an ensemble or a file with test-time flips averaged over its members
and flips (trainables.scoring). --explain adds a Grad-CAM overlay per image (of the first
member, in an ensemble). Only the standard library is
imported until the arguments are valid, so --help and argument errors answer at once.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import stat
import sys
from pathlib import Path

from search.cli import DEFAULT_TRACKING_URI, DefaultsFormatter, OneLineParser, folder_unwritable, parse_window
from search.errors import UsageError
from search.inference.model_source import MODEL_FORMS, model_source
from search.tracking.registered import RegisteredModel

DEVICES = ("auto", "cpu", "cuda")
EXPLAIN_INSTALL = 'pip install "hpo-classifiers[explain]"'
"""What --explain needs: the extra that brings pytorch-grad-cam (from 1.5.7 on headless OpenCV, no libGL)."""


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="search/predict.py",
        description="Predict the class of every image in a folder with a registered (or local) model: one CSV row "
        "per image with the calibrated probability of every class; --explain adds a Grad-CAM overlay per image.",
        formatter_class=DefaultsFormatter,
    )
    what = parser.add_argument_group("model and images")
    what.add_argument(
        "--model",
        required=True,
        help=f"{MODEL_FORMS} (or final.py's results folder holding it, or a study's best_model.pt)",
    )
    what.add_argument(
        "--images", required=True, metavar="DIR", help="a folder (searched recursively) or one image file"
    )
    what.add_argument(
        "--tracking-uri", default=DEFAULT_TRACKING_URI, metavar="URI", help="MLflow store of a models:/ model"
    )
    what.add_argument(
        "--window",
        default=None,
        metavar="CENTER,WIDTH",
        help="DICOM images only: window them with CENTER,WIDTH (in the units after the file's rescale; "
        "--window=-600,1500 with '=' before a negative center) instead of the window the model was trained with "
        "(its study's --window, kept in the model file), or where it has none, each file's own",
    )

    results = parser.add_argument_group("results")
    results.add_argument(
        "--out",
        default="predictions.csv",
        metavar="FILE.csv",
        help="the CSV to write; unreadable images are listed in <name>_skipped.txt beside it",
    )
    results.add_argument(
        "--explain",
        action="store_true",
        help="also write a Grad-CAM overlay of the predicted class per image, to <name>_saliency/ beside --out",
    )

    running = parser.add_argument_group("running")
    running.add_argument("--batch-size", type=int, default=32, metavar="N", help="images per batch on the device")
    running.add_argument("--device", default="auto", choices=DEVICES, help="auto: the GPU when there is one")
    return parser


def check_arguments(args: argparse.Namespace) -> RegisteredModel | Path:
    """Every problem found without loading anything heavy, reported at once; the model's source when none."""
    problems = []
    source: RegisteredModel | Path | None = None
    try:
        source = model_source(args.model)
    except ValueError as error:
        problems.append(str(error))
    if not os.path.exists(args.images):
        problems.append(f"--images {args.images}: no such folder or file")
    problems += out_problems(Path(args.out))
    if args.batch_size < 1:
        problems.append(f"--batch-size {args.batch_size}: give at least 1")
    try:
        parse_window(args.window)
    except UsageError as error:
        problems.append(str(error))
    if args.explain and importlib.util.find_spec("pytorch_grad_cam") is None:
        problems.append(f"--explain needs pytorch-grad-cam: {EXPLAIN_INSTALL}")
    if problems or source is None:
        raise UsageError("; ".join(problems))
    return source


def out_problems(out: Path) -> list[str]:
    """Why the CSV cannot be written at `out`, found before an image is predicted: its kind, its folder."""
    if out.is_dir():
        return [f"--out {out} is a folder: name a CSV file in it, e.g. {out / 'predictions.csv'}"]
    if out.suffix.lower() != ".csv":
        return [f"--out {out}: name a .csv file, e.g. {out.with_suffix('.csv')}"]
    if not out.parent.is_dir():
        return [f"--out {out}: its folder {out.parent} does not exist; create it or write elsewhere"]
    unwritable = folder_unwritable(out.parent)
    if unwritable:
        return [f"--out {out}: its folder {out.parent} cannot be written ({unwritable}); write the CSV elsewhere"]
    if out.exists() and not out.is_file():  # a pipe or a device: the CSV would take its place
        return [f"--out {out} exists and is not a file: name another CSV"]
    if out.exists() and not replaceable(out):
        return [f"--out {out} exists and belongs to another user in a sticky folder: name another CSV"]
    return []


def replaceable(out: Path) -> bool:
    """Whether the CSV may be renamed over `out`: in a folder with the sticky bit (/tmp), only by the owner of
    `out` or of the folder (or root); elsewhere whoever may write the folder, which folder_unwritable checked."""
    folder = out.parent.stat()
    if not folder.st_mode & stat.S_ISVTX or not hasattr(os, "geteuid"):
        return True
    user = os.geteuid()
    return user == 0 or user in (folder.st_uid, out.lstat().st_uid)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        source = check_arguments(args)
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # our progress only
        from search.inference.pipeline import execute_prediction, prepare_prediction  # numpy and PIL; torch later

        prepared = prepare_prediction(args, source)
        return execute_prediction(prepared)
    except UsageError as error:
        print(f"search/predict.py: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nstopped before predicting: nothing was written")
        return 130


if __name__ == "__main__":
    sys.exit(main())
