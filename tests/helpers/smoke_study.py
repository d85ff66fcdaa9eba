"""The one vit --smoke study that several test modules read back, and how they read it.

Run once per test session (the `smoke_study` fixture of tests/conftest.py) as a user runs it:
search/run.py in its own process, from a folder laid out like the project (its spaces/), with the
default store, Optuna database, Ray folder and cache, all relative to it. Five trials, one at a
time, so that ASHA prunes one and four complete, every time: enough for the parameter importances
and the plots that compare trials. Its users only read it; a test that changes a study builds its own.
"""

from __future__ import annotations

import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from filelock import FileLock

from helpers import ROOT, run_script

NAME, MODEL, TRIALS, CLASSES = "record", "vit", 5, 11
SMOKE_STUDY = ("--model", MODEL, "--smoke", "--data", "synthetic", "--no-pretrained", "--gpus-per-trial", "0")
"""The flags every study of this kind shares; NAME's adds its trials, name, seed and one trial at a time."""
OUTCOMES = ("completed", "pruned", "failed")
CONSOLE_FILE, SECONDS_FILE = "console.txt", "seconds.txt"
"""What run.py printed and how long it took, kept beside the study for the workers that read it later."""


@dataclass(frozen=True)
class Record:
    """A finished study: where it ran, what it printed, how long it took, and what MLflow holds of it."""

    root: Path
    console: str
    """What run.py printed, stdout then stderr."""
    seconds: float
    client: Any
    experiment: Any
    parent: Any
    children: list
    """The trials' runs, in label order (t00, t01, ...)."""
    winner: dict
    """best_config.yaml of the study's run."""

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.root}/mlflow/mlflow.db"

    @property
    def optuna_url(self) -> str:
        return f"sqlite:///{self.root}/mlflow/optuna.db"

    @property
    def winner_run(self):
        (run,) = [run for run in self.children if run.data.tags["ray_trial_id"] == self.winner["trial_id"]]
        return run

    def counts(self) -> str:
        """'4 trials: 3 completed, 1 pruned', from the trials' status tags."""
        outcomes = Counter(run.data.tags["trial_status"] for run in self.children)
        parts = ", ".join(f"{outcomes[outcome]} {outcome}" for outcome in OUTCOMES if outcomes[outcome])
        return f"{len(self.children)} trials: {parts}"

    def history(self, run, key: str) -> list[tuple[int, float]]:
        return sorted((m.step, m.value) for m in self.client.get_metric_history(run.info.run_id, key))

    def download(self, artifact_path: str) -> Path:
        """An artifact of the study's run, downloaded into this test process's own folder under root."""
        return Path(self.client.download_artifacts(self.parent.info.run_id, artifact_path, str(downloads(self.root))))


def run_in(root: Path, *args: str) -> tuple[Any, float]:
    """search/run.py run from `root`: the finished process and its seconds."""
    start = time.perf_counter()
    result = run_script("run.py", *args, cwd=root)
    return result, time.perf_counter() - start


def project_folder(tmp_path_factory, name: str) -> Path:
    """A new folder laid out like the project: its spaces/, and nothing else yet."""
    return laid_out_like_the_project(tmp_path_factory.mktemp(name))


def laid_out_like_the_project(root: Path) -> Path:
    """root (made if need be) with the project's spaces/ in it, as run.py expects from its working directory."""
    shutil.copytree(ROOT / "spaces", root / "spaces")
    return root


def trial_of(run) -> str:
    return run.data.tags["trial"]


def read_record(root: Path, name: str, console: str, seconds: float) -> Record:
    """What the store under root/mlflow holds of study `name`."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root}/mlflow/mlflow.db")
    experiment = client.get_experiment_by_name(MODEL)
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.study = '{name}'")
    (parent,) = [run for run in runs if "mlflow.parentRunId" not in run.data.tags]
    children = [run for run in runs if run.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    local = client.download_artifacts(parent.info.run_id, "best/best_config.yaml", str(downloads(root)))
    winner = yaml.safe_load(Path(local).read_text())
    return Record(root, console, seconds, client, experiment, parent, sorted(children, key=trial_of), winner)


def downloads(root: Path) -> Path:
    """Where this test process downloads the study's artifacts: pytest-xdist's workers read the study side by side."""
    folder = root / f"download-{os.environ.get('PYTEST_XDIST_WORKER', 'main')}"
    folder.mkdir(exist_ok=True)
    return folder


def run_smoke_study(tmp_path_factory) -> Record:
    """The session's study (see the module's docstring), run by the first test process that asks for it and read
    back by each: pytest-xdist's workers share the session's folder, and a lock makes the others wait for it."""
    if "PYTEST_XDIST_WORKER" not in os.environ:  # one process: this session's folder is its own
        return build_smoke_study(project_folder(tmp_path_factory, NAME))
    shared = tmp_path_factory.getbasetemp().parent  # the session's, above each worker's own
    with FileLock(shared / f"{NAME}.lock"):
        root = shared / NAME
        if not (root / CONSOLE_FILE).is_file():
            shutil.rmtree(root, ignore_errors=True)  # a worker that failed half-way
            return build_smoke_study(laid_out_like_the_project(root))
    return read_record(root, NAME, (root / CONSOLE_FILE).read_text(), float((root / SECONDS_FILE).read_text()))


def build_smoke_study(root: Path) -> Record:
    """run.py in root (laid out like the project), once; what it printed and took are kept beside the study."""
    # One trial at a time, so that what ASHA stops does not depend on which trial's epoch comes first on a busy
    # machine; seed 3's 5 trials then always leave 4 completed, of 4 different scores (t02 pruned), so the
    # importances and plots have trials to compare. (Two at a time, seed 1's left t00 and t03 alone at one score
    # whenever ASHA stopped t01: nothing to compare them by.)
    args = ("--trials", str(TRIALS), "--name", NAME, "--seed", "3", "--max-concurrent", "1")
    result, seconds = run_in(root, *SMOKE_STUDY, *args)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (root / SECONDS_FILE).write_text(str(seconds))
    (root / CONSOLE_FILE).write_text(result.stdout + result.stderr)  # last: the study is complete
    return read_record(root, NAME, result.stdout + result.stderr, seconds)
