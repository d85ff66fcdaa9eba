"""What the scripts write into the project root by default stays out of `git status`."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from helpers import ROOT

from search.inference.output import saliency_folder, skipped_file
from search.predict import build_parser as predict_parser

pytestmark = pytest.mark.skipif(
    shutil.which("git") is None or not (ROOT / ".git").exists(), reason="needs a git checkout"
)

PREDICTIONS = Path(predict_parser().get_default("out"))
DEFAULT_OUTPUTS = [
    "data/benign/001.png",  # run.py's default --data
    "mlflow/mlflow.db",  # the default store, its locks and artifacts
    "mlflow/optuna.db",
    "mlflow/artifacts/1/run/model.pt",
    "ray_results/cnn-20261207-101500/best/best_model.pt",
    ".cache/images/train-32px-0123.npy",
    "final/cnn-20261207-101500-20261207-111500/model.pt",  # final.py's default --out
    "comparisons/compare/report.md",  # compare.py's default --out
    str(PREDICTIONS),  # predict.py's default --out, and what it writes beside it
    str(skipped_file(PREDICTIONS)),
    str(saliency_folder(PREDICTIONS) / "benign" / "001.png.png"),
]


@pytest.mark.parametrize("path", DEFAULT_OUTPUTS)
def test_a_default_output_is_ignored_by_git(path):
    checked = subprocess.run(["git", "check-ignore", "--no-index", "-q", path], cwd=ROOT)
    assert checked.returncode == 0, f"{path} would show in git status"


def test_the_project_s_own_files_are_not_ignored():
    checked = subprocess.run(["git", "check-ignore", "--no-index", "-q", "mlflow/README.md"], cwd=ROOT)
    assert checked.returncode == 1
