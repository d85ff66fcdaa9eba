"""What the record is called and where it is, checked without MLflow (standard library only).

Tag names, the metrics a trial logs per epoch, and the checks of a tracking URI that
run before anything heavy loads: a bad address is refused at once, in one line.
"""

from __future__ import annotations

import errno
import os
import socket
import sqlite3
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from search.cli import DEFAULT_TRACKING_URI, folder_unwritable
from search.errors import UsageError
from search.records.location import is_uri
from search.records.trial_status import TrialStatus
from trainables.config import COST_METRICS, METRICS
from trainables.fidelity import COMPUTE_EPOCHS, EPOCH_IMG_SIZE

FIDELITY_METRICS = (COMPUTE_EPOCHS, EPOCH_IMG_SIZE)
"""A trial's compute so far in full-resolution epochs, and the image size of the epoch (trainables.fidelity)."""
EPOCH_METRICS = ("train_loss", *METRICS, "lr", *COST_METRICS, *FIDELITY_METRICS)
"""What a trial's run logs per epoch, where its result has it: the costs are measured when a study needs them
(parameters always, peak memory on CUDA, latency in a study that trades accuracy against it)."""
STATUS_TAG = "trial_status"
TRIAL_ID_TAG = "ray_trial_id"
TRIAL_LABEL_TAG = "trial"
"""A trial's short name (t07): its child run's name until the trial ends, then with the outcome added."""
NODES_TAG = "ray_nodes"
"""The Ray nodes a trial trained on, in order, comma-separated: more than one where a failure moved it."""
STUDY_TAG = "study"
PARENT_TAG = "mlflow.parentRunId"
# A final retrain carries the study tag too, but is no study: its role says so.
ROLE_TAG, FINAL_ROLE, CONFIRM_ROLE = "role", "final", "confirm"
"""A run's role where it is not a search trial: a final retrain, or a confirmation's retrain of a trial's
configuration with another seed."""
RECIPE_TAG = "recipe"
"""On the runs that train the recipe (the knobs' defaults clipped into the space): the study's first trial, t00,
and a confirmation's retrains of it. Its value is "true"."""
RECIPE_METRIC_PREFIX = "recipe_"
"""The study's run logs the recipe's best score as recipe_<metric> (recipe_val_acc)."""
COMPUTE_VS_RECIPE = "compute_vs_recipe"
"""The study's compute (its run's compute_epochs: every trial's, summed) over one full training of the recipe."""
GAIN_METRIC = "gain_over_recipe"
"""The winner's best score minus the recipe's, signed so that a positive gain is better (val_loss: the recipe's
minus the winner's); confirmed_gain_over_recipe: the same of their means over the confirmation's seeds."""
EXTENDED_TAG = "extended"
"""On an extended study's run: its trials before and after the latest extension ("30 -> 50")."""
TUNE_RUN_TAG = "tune_run"
"""Which of its study's Tune runs a trial's run belongs to, where it is not the first search: an extension's
folder (trials-31-50) or a confirmation's (confirm, trials-31-50/confirm)."""
BEST_DIR = "best"
"""The winner's files (best_config.yaml, best_model.pt): a folder of the study's Ray folder and of its run."""
BEST_CONFIG_FILE, BEST_MODEL_FILE = "best_config.yaml", "best_model.pt"
FINAL_MODEL_FILE = "model.pt"
"""final.py's model file (trainables.checkpoint.ModelFile) in its results folder and in a registered version."""
MODEL_FILE_IN_MODEL = f"extra_files/{FINAL_MODEL_FILE}"
"""Where a registered version keeps it (MLflow's extra_files keep a file's name): what search/predict.py
rebuilds the model from, to explain it (saliency needs the layers, not a graph)."""
BEST_CONFIG = f"{BEST_DIR}/{BEST_CONFIG_FILE}"
DATA_SUMMARY = "data.json"
"""The study's data summary (source, classes, images per split), an artifact of its parent run."""
SPLIT_FILE = "split.json"
"""Which images (and patients) each split of a study holds, an artifact of its parent run."""
LEAKS_FILE = "leakage.csv"
"""Every pair of duplicate images across splits the leakage check found, an artifact of the study's parent run."""
TRIAL_CONFIG = "hyperparameters.yaml"
"""A trial's configuration, as an artifact of its child run."""
ELAPSED_METRIC = "elapsed_s"
"""The study's running time on its run, summed over its sessions (a resumed study adds to it)."""
OPTUNA_FILE = "optuna.db"
"""The Optuna studies' SQLite file: its own, since MLflow and Optuna each keep an alembic_version table."""
EXPERIMENT_KIND_TAG, TRAINING_KIND = "mlflow.experimentKind", "custom_model_development"
"""What MLflow 3's UI reads to open an experiment on its model-training runs page, not its GenAI view."""

# Schemes of the stores MLflow 3 opens (a bare path would be its deprecated ./mlruns file store).
STORE_SCHEMES = ("sqlite", "http", "https", "postgresql", "mysql", "mssql", "databricks")
SERVER_TIMEOUT_S = 5


def check_store_uri(tracking_uri: str) -> None:
    """Refuse a tracking URI that cannot work, at once and without writing anything (standard library only)."""
    scheme = tracking_uri.partition("://")[0].split("+")[0] if "://" in tracking_uri else ""
    if scheme not in STORE_SCHEMES:
        raise UsageError(
            f"--tracking-uri {tracking_uri}: not a store MLflow opens; give sqlite:///path/to/mlflow.db "
            f"or the http://host:port of an mlflow server"
        )
    if scheme == "sqlite":
        check_sqlite_store(tracking_uri)
    elif scheme in ("http", "https"):
        check_server(tracking_uri)


def sqlite_path(tracking_uri: str) -> Path:
    return Path(tracking_uri.removeprefix("sqlite:///")).expanduser()


def check_sqlite_store(tracking_uri: str) -> None:
    """The database file is a writable SQLite database, or can be created where it is named."""
    path = sqlite_path(tracking_uri)
    where = f"--tracking-uri {tracking_uri}"
    if not tracking_uri.startswith("sqlite:///") or not path.name:
        raise UsageError(f"{where}: name a database file, e.g. sqlite:///mlflow/mlflow.db")
    if path.is_dir():
        raise UsageError(f"{where}: {path} is a folder; name a database file in it, e.g. {path / 'mlflow.db'}")
    folder = path.parent
    while not folder.exists():
        folder = folder.parent
    # SQLite writes a journal beside the database: the folder itself must take new files
    unwritable = folder_unwritable(folder) if folder.is_dir() else os.strerror(errno.ENOTDIR)
    if unwritable:
        raise UsageError(
            f"{where}: cannot create files in {folder} ({unwritable}): pass a --tracking-uri on a writable disk"
        )
    if not path.exists():
        return
    try:
        with closing(sqlite3.connect(f"file:{path}?mode=rw", uri=True, timeout=30)) as database:
            database.execute("BEGIN IMMEDIATE")  # takes the write lock: a read-only file or disk fails here
            database.rollback()
    except sqlite3.Error as error:
        raise UsageError(
            f"{where}: {path} cannot be written as an SQLite database ({error}): "
            f"pass a writable MLflow store, or a new file"
        ) from None


def check_server(tracking_uri: str) -> None:
    """Something listens at the server's address (MLflow's client would retry for minutes)."""
    address = urlparse(tracking_uri)
    port = address.port or (443 if address.scheme == "https" else 80)
    try:
        with socket.create_connection((address.hostname or "", port), timeout=SERVER_TIMEOUT_S):
            pass
    except OSError as error:
        raise UsageError(
            f"--tracking-uri {tracking_uri}: no MLflow server answers at {address.hostname}:{port} "
            f"({error.strerror or error}): start it, or use the local store {DEFAULT_TRACKING_URI}"
        ) from None


def store_exists(tracking_uri: str) -> bool:
    """False for a SQLite store whose file is missing (reading must not create it)."""
    if tracking_uri.startswith("sqlite:///"):
        return sqlite_path(tracking_uri).is_file()
    return True


def default_optuna_storage(tracking_uri: str, storage_path: str) -> str | None:
    """Beside a SQLite MLflow store (mlflow/optuna.db); under a folder --storage-path for a server or another
    database; None where the storage path is a URI (s3://...), which SQLite cannot write: the study must be told."""
    if tracking_uri.startswith("sqlite:///"):
        folder = sqlite_path(tracking_uri).parent
    elif not is_uri(storage_path):
        folder = Path(storage_path)
    else:
        return None
    return f"sqlite:///{(folder / OPTUNA_FILE).resolve()}"


def trial_label(experiment_tag: str, trials: int, first: int = 0) -> str:
    """A trial's short name, t00, t01, ...: Ray's trial counter from 0, which is Optuna's trial number too,
    unless a killed study had asked Optuna for trials after Ray's last snapshot (Ray draws those again
    under the numbers it had saved; their old runs are marked lost). An extension's Tune run counts from 1
    again: its trials are numbered from `first`, the trials the study had before.

    Ray's experiment tag starts with the 1-based counter ("3_lr=0.001,..."); its trial id is random hex.
    """
    return numbered(first + tune_counter(experiment_tag), trials)


def numbered(number: int, trials: int) -> str:
    """t07: a trial's number, as wide as the study's largest."""
    return f"t{number:0{max(2, len(str(trials - 1)))}d}"


def tune_counter(experiment_tag: str) -> int:
    """The trial's place in its Tune run, from 0."""
    return int(experiment_tag.split("_", 1)[0]) - 1


def recipe_labels(trials: int, runs_recipe: bool) -> frozenset[str]:
    """The name of a search's recipe trial (t00), where the search starts with one (StudyConfig.runs_recipe)."""
    return frozenset({numbered(0, trials)}) if runs_recipe else frozenset()


@dataclass(frozen=True)
class TrialNames:
    """How one Tune run's trials are named, on the terminal and as MLflow runs: t00, t01, ... from `first` (an
    extension's), or the given names in Ray's order (a confirmation's retrains, "t07 seed 1")."""

    trials: int
    """The study's trials: the width of the numbers."""
    first: int = 0
    given: tuple[str, ...] = ()

    def of(self, experiment_tag: str) -> str:
        if self.given:
            return self.given[tune_counter(experiment_tag)]
        return trial_label(experiment_tag, self.trials, self.first)


def outcome_name(label: str, outcome: str) -> str:
    """An ended trial's run name, "t07 pruned": its outcome shows in the runs table without opening it."""
    return f"{label} {outcome}"


SHARED_VIEW_TAG = "mlflow.sharedViewState."
"""An experiment tag (+ a key) holding a runs-page view (filter, sort, columns) that a URL opens: the UI's Share."""


LOCAL_UI = "http://127.0.0.1:5000"
"""Where `mlflow ui` serves a local store (its default address)."""


def is_server(tracking_uri: str) -> bool:
    """An MLflow tracking server, which serves the UI itself."""
    return tracking_uri.startswith(("http://", "https://"))


def ui_address(tracking_uri: str) -> str:
    """Where the UI of this store is: the server's own address, else `mlflow ui`'s default."""
    return tracking_uri.rstrip("/") if is_server(tracking_uri) else LOCAL_UI


def runs_page(tracking_uri: str, experiment_id: str, study: str) -> str:
    """A study's saved view of its experiment's runs page (search.tracking.runs_view), on the model-training view."""
    return (
        f"{ui_address(tracking_uri)}/#/experiments/{experiment_id}/runs"
        f"?viewStateShareKey={study}&workflowType=machine_learning"
    )


def run_page(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """One run's page, on the model-training view."""
    return f"{ui_address(tracking_uri)}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"


def mlflow_lines(tracking_uri: str, page: str) -> list[str]:
    """How to look at `page`: a server shows it at once; a local store through `mlflow ui` first."""
    if is_server(tracking_uri):
        return [f"MLflow:     open {page}"]
    return [
        f"MLflow:     mlflow ui --backend-store-uri {absolute_uri(tracking_uri)} --host 127.0.0.1 --port 5000",
        f"            then open {page}",
    ]


def absolute_uri(uri: str) -> str:
    """A SQLite URI with an absolute path: `mlflow ui` or a resumed study may run from another folder."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
    return uri


def trial_outcome(result: dict | None, error: bool) -> TrialStatus:
    """completed, pruned or failed: how a trial ended, from its last result.

    The trainable marks its last epoch with finished=True (budget spent or early
    stopping). A trial whose last result lacks it was stopped from outside: by ASHA.
    """
    if error:
        return TrialStatus.FAILED
    if result and result.get("finished"):
        return TrialStatus.COMPLETED
    return TrialStatus.PRUNED


def exception_line(error_file: str | None) -> str:
    """The line of a trial's traceback file that names the exception: its last."""
    if error_file is None:
        return "unknown error"
    try:
        lines = [line for line in Path(error_file).read_text().splitlines() if line.strip()]
    except OSError:
        return "unknown error"
    return lines[-1][:500] if lines else "unknown error"
