"""A study's name is claimed by one process at a time: two run.py of one name never both run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import ROOT, study_config

from search.errors import UsageError
from search.tracking.claim import claim_folders, claim_name

HOLDER = """
import sys, time
from pathlib import Path
from search.tracking.claim import claim_name
claim = claim_name("x", [Path(folder) for folder in sys.argv[1:]])
print("held", flush=True)
time.sleep(600)
"""


def hold_in_another_process(*folders: Path) -> subprocess.Popen:
    """A process that claims study x in the folders and keeps it, once it says so."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, *map(str, folders)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout is not None and holder.stdout.readline() == "held\n"
    return holder


def test_a_claimed_name_is_refused_to_another_process_until_its_holder_is_killed(tmp_path):
    store, trials = tmp_path / "mlflow", tmp_path / "ray_results"
    holder = hold_in_another_process(store, trials)
    try:
        with pytest.raises(UsageError) as refused:
            claim_name("x", [store, trials])
        assert str(refused.value) == (
            f"study x is being run by another process (pid {holder.pid}): wait for it, or choose another --name"
        )
        claim_name("y", [store, trials]).release()  # another name in the same stores is free
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # no chance to release: the kernel drops its locks
        holder.wait(timeout=30)
    with claim_name("x", [store, trials]):  # taken over at once, nothing to clean up by hand
        assert (store / ".x.claim").read_text().split()[0] == str(os.getpid())
    assert not (store / ".x.claim").exists() and not (trials / ".x.claim").exists()


def test_the_claim_leaves_nothing_behind(tmp_path):
    """A refused study wrote nothing: the folders made to hold the lock files go again."""
    folder = tmp_path / "new" / "mlflow"
    with claim_name("x", [folder]):
        assert (folder / ".x.claim").is_file()
    assert list(tmp_path.iterdir()) == []


def test_a_folder_that_cannot_be_written_is_passed_over(tmp_path):
    """The store checks that follow refuse it in their own words."""
    (tmp_path / "file").write_text("")
    with claim_name("x", [tmp_path / "file" / "below", tmp_path / "ok"]):
        assert (tmp_path / "ok" / ".x.claim").is_file()


def test_the_claim_covers_each_local_folder_the_study_writes_to(tmp_path):
    local = study_config(
        tracking_uri=f"sqlite:///{tmp_path}/mlflow/mlflow.db",
        optuna_storage=f"sqlite:///{tmp_path}/optuna/optuna.db",
        storage_path=str(tmp_path / "ray_results"),
    )
    assert claim_folders(local) == [tmp_path / "mlflow", tmp_path / "optuna", tmp_path / "ray_results"]
    shared = study_config(
        tracking_uri="http://mlflow:5000",
        optuna_storage="postgresql://db/optuna",
        storage_path="s3://bucket/studies",
    )
    assert claim_folders(shared) == []  # the Optuna database's unique study name is the claim there


def test_a_database_shared_across_machines_claims_a_new_study_by_its_unique_name(tmp_path):
    """Where no lock file can: the Optuna study is created just before the study's MLflow run opens; a second
    creation is refused in one line, and a study whose run did not open is dropped again."""
    import optuna

    from search.tracking.study_run import claim_optuna_study, drop_optuna_study

    config = study_config(name="x", optuna_storage=f"sqlite:///{tmp_path}/optuna.db", objective="accuracy,latency")
    assert claim_optuna_study(config)
    study = optuna.load_study(study_name="x", storage=config.optuna_storage)
    assert study.directions == [optuna.study.StudyDirection.MAXIMIZE, optuna.study.StudyDirection.MINIMIZE]
    with pytest.raises(UsageError, match=r"^study x is being run by another process: wait for it, or choose"):
        claim_optuna_study(config)
    drop_optuna_study(config)
    assert optuna.get_all_study_names(config.optuna_storage) == []


@pytest.mark.slow
def test_two_studies_of_one_name_started_together_one_runs_and_the_other_is_refused(tmp_path):
    """Both pass the name checks at the same moment; the claim lets one through. The other says so in one line,
    exit 2, and has written nothing: one study run in MLflow, the Optuna study holds the first's trial only."""
    import optuna
    from mlflow.tracking import MlflowClient

    (tmp_path / "spaces").symlink_to(ROOT / "spaces")
    study = ["--model", "vit", "--trials", "1", "--epochs", "1", "--smoke", "--img-size", "32"]
    study += ["--data", "synthetic:3", "--no-pretrained", "--name", "same"]
    command = [sys.executable, str(ROOT / "search" / "run.py"), *study]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    started = time.monotonic()
    processes = [
        subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    results = [(process, *process.communicate(timeout=600)) for process in processes]
    assert time.monotonic() - started < 600
    (ran,) = [result for result in results if result[0].returncode == 0]
    (refused,) = [result for result in results if result[0].returncode != 0]
    assert refused[0].returncode == 2, refused[2][-3000:]
    assert refused[2].splitlines() == [
        f"search/run.py: error: study same is being run by another process (pid {ran[0].pid}): wait for it, "
        f"or choose another --name"
    ]
    assert refused[1] == ""
    assert "Study same: 1 trials: 1 completed" in ran[1]

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.study = 'same'")
    parents = [run for run in runs if "mlflow.parentRunId" not in run.data.tags]
    assert [run.info.status for run in parents] == ["FINISHED"]
    trial_ids = {run.data.tags["ray_trial_id"] for run in runs if "mlflow.parentRunId" in run.data.tags}
    trials = optuna.load_study(study_name="same", storage=f"sqlite:///{tmp_path}/mlflow/optuna.db").trials
    assert len(trials) == 1 and {trial.user_attrs["ray_trial_id"] for trial in trials} == trial_ids
    assert sorted(path.name for path in Path(tmp_path, "ray_results").iterdir()) == ["same"]  # no claim file left
