"""What the command-line scripts share: one-line errors and honest defaults in --help.

Standard library only, so that --help answers at once.
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

from search.errors import UsageError
from trainables.config import window_problem  # standard library only, as this module

DEFAULT_TRACKING_URI = "sqlite:///mlflow/mlflow.db"
DEFAULT_CACHE_DIR = ".cache/images"
"""The decoded-image cache that run.py and final.py share."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line on stderr (exit code 2), not usage plus error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only where there is one: a None default is explained in the help text itself."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or action.default == []:
            return action.help
        return super()._get_help_string(action)


def given_options(parser: argparse.ArgumentParser, argv: list[str] | None) -> set[str]:
    """The dests of the options `argv` sets itself: a flag left out is not given, even where its default differs
    from what a study recorded. `parser` is spent on it (its defaults are suppressed): pass a fresh one."""
    for action in parser._actions:  # argparse lists its actions nowhere public
        action.default = argparse.SUPPRESS  # an option left out then leaves no attribute
    return set(vars(parser.parse_args(argv)))


def add_weights_argument(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--weights",
        action="append",
        default=[],
        metavar="BACKBONE=PATH",
        help="local pretrained weights for a backbone (tf_efficientnetv2_s or vit_tiny_patch16_224); repeatable",
    )


def weights_problems(items: list[str]) -> list[str]:
    return [
        f"--weights {item}: write BACKBONE=PATH, e.g. tf_efficientnetv2_s=weights.safetensors"
        for item in items
        if "=" not in item
    ]


def weights_files(items: list[str]) -> tuple[tuple[str, str], ...]:
    """--weights items as sorted (backbone, path) pairs; the malformed ones, which weights_problems
    reports, are left out."""
    return tuple(sorted(tuple(item.split("=", 1)) for item in items if "=" in item))  # type: ignore[misc]


WINDOW_HELP = (
    "DICOM images only: window every image with CENTER,WIDTH, in the units after the file's rescale (a CT's "
    "Hounsfield units: 40,400 soft tissue; --window=-600,1500 lung, with '=' before a negative center) instead of "
    "each file's own window or VOI LUT (default: the file's, else the image's min..max)"
)
"""--window's help, the same for run.py (and compare.py) and predict.py."""


def parse_window(text: str | None) -> tuple[float, float] | None:
    """--window CENTER,WIDTH as (center, width); None where it was not given. A UsageError says how to write it."""
    if text is None:
        return None
    try:
        center, width = (float(part) for part in text.split(","))
    except ValueError:
        raise UsageError(
            f"--window {text}: write CENTER,WIDTH, two numbers such as 40,400 (a CT's soft tissue in Hounsfield units)"
        ) from None
    problem = window_problem((center, width))
    if problem:
        raise UsageError(f"--window {text}: {problem}")
    return center, width


def require_pretrained(backbones: tuple[str, ...], weights: tuple[tuple[str, str], ...]) -> None:
    """These timm models' pretrained weights are at hand (cached, downloadable or given by --weights),
    or a one-line UsageError says how to get them."""
    # Deferred: timm loads here, once the arguments are known to be good.
    from trainables.pretrained import PretrainedUnavailable, ensure_pretrained

    try:
        ensure_pretrained(backbones, dict(weights))
    except PretrainedUnavailable as error:
        raise UsageError(str(error)) from None


@contextmanager
def interrupts_ignored() -> Iterator[None]:
    """Ctrl-C is ignored inside: for short writes to the record that must not stop half-way."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread handles signals
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def folder_unwritable(folder: Path) -> str | None:
    """Why no new file can be made in `folder` (the OS's words), or None where one can. Tried with a real file:
    permission bits say nothing of a read-only mount, and root passes them all."""
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass  # made, then removed on closing
    except OSError as error:
        return error.strerror or type(error).__name__
    return None


def bars_wanted() -> bool:
    """Progress bars on a terminal only. Redirected to a file (nohup, a cluster job, a test's capture), a
    bar is redrawn with carriage returns into one endless line; there, scripts print plain lines instead."""
    return sys.stdout.isatty() and sys.stderr.isatty()  # the bars draw on stderr, the lines go to stdout
