"""The Optuna studies in a database of their own, so that optuna-dashboard shows a study live.

One SQLite file beside the MLflow store by default (schema.default_optuna_storage): MLflow
and Optuna each keep an alembic_version table, so they cannot share one. Ray's OptunaSearch
writes every asked, reported and told trial there; the study's report reads it back.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import optuna
from filelock import FileLock
from optuna.trial import TrialState

from search.errors import UsageError, one_line
from search.tracking.schema import sqlite_path

SQLITE_TIMEOUT_S = 30
"""How long a write waits for another study's write to the same file."""


def open_optuna_storage(url: str) -> optuna.storages.RDBStorage:
    """The storage, its tables created if new (under a file lock: studies may start together on a new file)."""
    lock: AbstractContextManager = nullcontext()
    engine_kwargs = {}
    if url.startswith("sqlite:///"):
        path = sqlite_path(url)
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(f"{path}.lock")
        engine_kwargs = {"connect_args": {"timeout": SQLITE_TIMEOUT_S}}
    try:
        with lock:
            return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)
    except Exception as error:  # SQLAlchemy and Optuna raise many types; the first line says which
        raise UsageError(f"cannot open the Optuna storage --optuna-storage {url}: {one_line(error)}") from None


def existing_optuna_storage(url: str) -> optuna.storages.RDBStorage | None:
    """The storage, or None for a SQLite file that does not exist (reading must not create it)."""
    if url.startswith("sqlite:///") and not sqlite_path(url).is_file():
        return None
    return open_optuna_storage(url)


def holds(storage: optuna.storages.RDBStorage | None, name: str) -> bool:
    """Whether the storage (None: none) holds a study of this name."""
    return storage is not None and name in optuna.get_all_study_names(storage)


def study_exists(url: str, name: str) -> bool:
    return holds(existing_optuna_storage(url), name)


def load_study(url: str, name: str) -> optuna.Study | None:
    """The study as the storage has it, or None where it holds none."""
    storage = existing_optuna_storage(url)
    if storage is None or not holds(storage, name):
        return None
    return optuna.load_study(study_name=name, storage=storage)


def fail_orphans(study: optuna.Study) -> int:
    """Trials left RUNNING once the whole study has ended, marked FAIL; how many.

    A killed study can have asked Optuna for trials after Ray's last snapshot: Ray draws
    those afresh on resume, and Optuna's copies would otherwise stay RUNNING for good.
    """
    orphans = [trial for trial in study.get_trials(deepcopy=False) if trial.state == TrialState.RUNNING]
    for trial in orphans:
        study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
    return len(orphans)
