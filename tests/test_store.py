"""The MLflow store: studies started together share a new SQLite store safely."""

from __future__ import annotations

import multiprocessing
import time

from search.tracking.store import mlflow_client

OPENERS = 3


def open_and_record(uri: str, start_at: float, name: str) -> str:
    """In a fresh process, as a study's driver would: open the store at one agreed instant, then write to it."""
    while time.time() < start_at:
        time.sleep(0.001)
    try:
        client = mlflow_client(uri)
        client.create_run(client.create_experiment(name), run_name=name)
        return "ok"
    except BaseException as error:  # report, do not hang the pool
        return f"{type(error).__name__}: {error}"


def test_studies_that_open_a_new_sqlite_store_together_all_record_and_leave_it_whole(tmp_path):
    """Without the lock MLflow's migrations race: 'table _alembic_tmp_... already exists', a half-migrated store."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    start_at = time.time() + 8  # after every process has imported MLflow
    with multiprocessing.get_context("spawn").Pool(OPENERS) as pool:
        # A bounded wait: a worker lost on a loaded machine fails the test, where a plain starmap hangs the run.
        waiting = pool.starmap_async(open_and_record, [(uri, start_at, f"study-{i}") for i in range(OPENERS)])
        outcomes = waiting.get(timeout=300)
    assert outcomes == ["ok"] * OPENERS
    client = mlflow_client(uri)
    names = {e.name for e in client.search_experiments()}
    assert {f"study-{i}" for i in range(OPENERS)} <= names
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == OPENERS
