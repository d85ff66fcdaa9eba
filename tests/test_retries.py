"""--max-failures: a crashed trial is retried from its last checkpoint, nothing finished lost or doubled.

The project's real orchestration (make_tuner, PruneAwareOptunaSearch, ASHA, the
MlflowTrials callback on a SQLite store) around a trainable shaped like train_trial
whose epochs cost nothing and which crashes once, right after reporting epoch 1.
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from helpers import study_config
from optuna.trial import TrialState

import search.study.tuning
from search.study.spaces import load_space
from search.study.tuning import make_tuner, trial_setup
from search.tracking.schema import PARENT_TAG, STATUS_TAG, STUDY_TAG
from search.tracking.store import get_or_create_experiment, mlflow_client
from search.tracking.trials import MlflowTrials
from trainables.data import CachedSplit
from trainables.models import ModelSpec

SPACES = Path(__file__).resolve().parents[1] / "spaces"
EPOCHS, CRASH_AFTER = 3, 1
STATE_FILE = "state.json"


class Crash(RuntimeError):
    """The fault this test injects: a worker dying mid-trial."""


def crash_once_trial(config: dict, epochs: int, marker: str, log_path: str) -> None:
    """Like train_trial: restore from tune.get_checkpoint(), then per epoch report with a checkpoint.

    Its first attempt raises right after reporting epoch CRASH_AFTER. The marker file
    says whether that crash has happened: each attempt runs in a fresh worker process.
    """
    from ray import tune

    first = 1
    restored = tune.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as directory:
            first = json.loads((Path(directory) / STATE_FILE).read_text())["epoch"] + 1

    def record(event: dict) -> None:
        with open(log_path, "a") as log:
            log.write(json.dumps(event) + "\n")

    record({"attempt_from": first})
    for epoch in range(first, epochs + 1):
        loss = 1.0 / epoch
        metrics = {
            "train_loss": loss,
            "val_loss": loss,
            "val_acc": 1 - loss,
            "val_balanced_acc": 1 - loss,
            "val_macro_f1": 1 - loss,
            "lr": config["lr"],
            "epoch": epoch,
            "finished": epoch == epochs,
        }
        record({"epoch": epoch})  # before report: nothing after a report is sure to run
        with tempfile.TemporaryDirectory() as directory:
            (Path(directory) / STATE_FILE).write_text(json.dumps({"epoch": epoch}))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(directory))
        if epoch == CRASH_AFTER and not Path(marker).exists():
            Path(marker).touch()
            raise Crash(f"injected crash after epoch {epoch}")


@pytest.fixture(scope="module")
def ray_cluster():
    import ray
    from ray import cloudpickle

    # Ray's workers cannot import this test module: ship its trainable by value.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def run_study(tmp_path: Path, max_failures: int, monkeypatch) -> dict:
    """One trial through make_tuner; what Ray, Optuna, MLflow and the trainable itself saw."""
    from ray import tune

    monkeypatch.setenv("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")  # as search/run.py sets it
    searchers = []
    make_searcher = search.study.tuning.make_searcher
    monkeypatch.setattr(
        search.study.tuning, "make_searcher", lambda *a: searchers.append(make_searcher(*a)) or searchers[-1]
    )

    name, uri, log_path = f"retry{max_failures}", f"sqlite:///{tmp_path}/mlflow.db", tmp_path / "trial.jsonl"
    unused = CachedSplit(str(tmp_path / "unused.npy"), np.zeros(0, dtype=np.int64))  # this trainable reads no data
    config = study_config(
        name=name,
        trials=1,
        epochs=EPOCHS,
        grace_period=EPOCHS,
        reduction_factor=2,
        storage_path=str(tmp_path / "ray"),
        tracking_uri=uri,
        max_failures=max_failures,
    )
    setup = trial_setup(config, ModelSpec("cnn", 3, 32, pretrained=False), unused, unused)
    trainable = tune.with_resources(
        tune.with_parameters(crash_once_trial, epochs=EPOCHS, marker=str(tmp_path / "crashed"), log_path=str(log_path)),
        {"cpu": 1, "gpu": 0},
    )
    client = mlflow_client(uri)
    experiment_id = get_or_create_experiment(client, "retries", uri)
    parent_id = client.create_run(experiment_id, run_name=name, tags={STUDY_TAG: name}).info.run_id
    no_data = {"name": "none", "digest": "0", "source_type": "code", "source": "{}"}  # it reads none
    callbacks = [MlflowTrials(uri, experiment_id, parent_id, config, no_data)]

    results = make_tuner(load_space(SPACES / "cnn.yaml", "cnn"), setup, config, callbacks, trainable=trainable).fit()

    children = client.search_runs([experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}'")
    history = (
        {
            key: [(m.step, m.value) for m in client.get_metric_history(children[0].info.run_id, key)]
            for key in ("train_loss", "val_acc")
        }
        if children
        else {}
    )
    events = [json.loads(line) for line in log_path.read_text().splitlines()]
    (searcher,) = searchers
    return {
        "results": results,
        "children": children,
        "history": history,
        "attempts_from": [e["attempt_from"] for e in events if "attempt_from" in e],
        "epochs_run": [e["epoch"] for e in events if "epoch" in e],
        "optuna": searcher.study.trials,
    }


def test_a_crashed_trial_resumes_from_its_checkpoint(ray_cluster, tmp_path, monkeypatch):
    study = run_study(tmp_path, max_failures=1, monkeypatch=monkeypatch)

    # It crashed once and the retry began after the checkpointed epoch: no epoch ran twice.
    assert (tmp_path / "crashed").exists()
    assert study["attempts_from"] == [1, CRASH_AFTER + 1]
    assert study["epochs_run"] == [1, 2, 3]
    # Ray: the trial finished its whole budget.
    results = study["results"]
    assert results.num_errors == 0 and len(results) == 1
    assert results[0].metrics["epoch"] == EPOCHS and results[0].metrics["finished"] is True
    # MLflow: one child run for the trial, each epoch logged once, closed as completed.
    assert len(study["children"]) == 1, "one child run per trial, not one per attempt"
    child = study["children"][0]
    assert child.info.status == "FINISHED" and child.data.tags[STATUS_TAG] == "completed"
    assert [step for step, _ in study["history"]["val_acc"]] == [1, 2, 3]
    assert [step for step, _ in study["history"]["train_loss"]] == [1, 2, 3]
    assert study["history"]["val_acc"][-1][1] == pytest.approx(1 - 1 / EPOCHS)
    # Optuna: one COMPLETE trial with the best score, its epoch-1 report kept from before the crash.
    (trial,) = study["optuna"]
    assert trial.state == TrialState.COMPLETE and trial.value == pytest.approx(1 - 1 / EPOCHS)


def test_without_retries_the_crash_fails_the_trial(ray_cluster, tmp_path, monkeypatch):
    study = run_study(tmp_path, max_failures=0, monkeypatch=monkeypatch)

    assert study["attempts_from"] == [1] and study["epochs_run"] == [1]
    assert study["results"].num_errors == 1
    (child,) = study["children"]
    assert child.info.status == "FAILED" and child.data.tags[STATUS_TAG] == "failed"
    assert "injected crash after epoch 1" in child.data.tags["failure"]
    # The epoch that finished before the crash stays on record.
    assert [step for step, _ in study["history"]["val_acc"]] == [1]
    (trial,) = study["optuna"]
    assert trial.state == TrialState.FAIL
