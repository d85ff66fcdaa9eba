"""Faults lose nothing finished: crashed trials are recorded, Ctrl-C and kill -9 resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import ROOT, mounted_tmpfs, run_script, write_image_folder
from helpers.cli import call_main, one_line_refusal

TRIALS = 3


def study_args(tmp_path: Path, name: str, *extra: str, data: str = "synthetic") -> list[str]:
    return [
        "--model",
        "vit",
        "--smoke",
        "--data",
        data,
        "--no-pretrained",
        "--epochs",
        "2",
        "--name",
        name,
        "--tracking-uri",
        f"sqlite:///{tmp_path}/mlflow.db",
        "--storage-path",
        str(tmp_path / "ray"),
        "--cache-dir",
        str(tmp_path / "cache"),
        *extra,
    ]


def study_runs(tmp_path: Path, name: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, filter_string=f"tags.study = '{name}'")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return client, parents, children


def test_trials_that_diverge_are_failed_and_the_study_goes_on(tmp_path):
    (tmp_path / "space.yaml").write_text(
        "parameters:\n  lr: {type: categorical, choices: [0.001, 1.0e+6]}\n  weight_decay: {type: fixed, value: 0.0}\n"
    )
    # Real-world mess in the data too: a corrupt image and a file that is no image.
    images = write_image_folder(tmp_path / "images", {"a": 10, "b": 10, "c": 10}, size=48)
    (images / "a" / "003.png").write_bytes(b"\x89PNG truncated")
    (images / "b" / "notes.txt").write_text("not an image")
    args = study_args(tmp_path, "faulty", "--trials", "4", "--space", "space.yaml", data="images")
    result = run_script("run.py", *args, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    _, parents, children = study_runs(tmp_path, "faulty")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert parents[0].data.metrics["skipped_images"] == 1 and parents[0].data.params["ignored_files"] == "1"
    assert "skipped 1 unreadable image(s), e.g. a/003.png" in result.stdout
    assert len(children) == 4
    failed = [c for c in children if c.data.tags["trial_status"] == "failed"]
    healthy = [c for c in children if c.data.tags["trial_status"] != "failed"]
    assert failed and healthy, [(c.data.params, c.data.tags["trial_status"]) for c in children]
    for child in failed:
        assert child.info.status == "FAILED" and child.data.params["lr"] == "1000000.0"
        assert "lower the learning rate" in child.data.tags["failure"]
        assert "\n" not in child.data.tags["failure"]
    assert all(c.data.params["lr"] == "0.001" for c in healthy)
    # One line per failed trial, Tune's ERROR and its traceback not at all: the exception and where the whole is.
    output = result.stdout + result.stderr
    assert "Traceback" not in output and "ERROR" not in output, output[-3000:]
    lines = [line for line in result.stdout.splitlines() if " failed: " in line]
    assert sorted(line.split()[0] for line in lines) == sorted(c.data.tags["trial"] for c in failed)
    for line in lines:
        assert line.split(" failed: ")[1].startswith("NonFiniteLoss: training loss became ")
        error_file = Path(line.removesuffix(")").rpartition(" (full log: ")[2])
        assert error_file.is_absolute() and "NonFiniteLoss" in error_file.read_text(), line


def test_a_failed_or_retried_trial_is_one_line_naming_its_exception_and_its_whole_log(tmp_path, capsys):
    """What EpochPrinter prints for a trial that failed (or will be retried): the exception without its module
    path, and where Ray keeps the traceback, a bucket's as a URI."""
    from types import SimpleNamespace

    from search.study.console import EpochPrinter
    from search.tracking.schema import TrialNames

    staged = tmp_path / "staged" / "error.txt"  # Ray writes it on the driver first, then copies it to the storage
    staged.parent.mkdir()
    staged.write_text("Failure # 1\nTraceback (most recent call last):\n  ...\ntrainables.engine.NonFiniteLoss: nan\n")

    def trial(kind: str, folder: str) -> SimpleNamespace:
        return SimpleNamespace(
            experiment_tag="1_lr=1e9", error_file=str(staged), path=folder, max_failures=1,
            run_metadata=SimpleNamespace(error_filename="error.txt", num_failures=1),
            storage=SimpleNamespace(storage_filesystem=SimpleNamespace(type_name=kind)),
        )  # fmt: skip

    printer = EpochPrinter(1, "val_acc", TrialNames(3))
    printer.on_trial_error(0, [], trial("local", "/abs/ray_results/s/train_trial_1"))
    printer.on_trial_recover(0, [], trial("s3", "bucket/studies/s/train_trial_1"))
    assert capsys.readouterr().out.splitlines() == [
        "t00 failed: NonFiniteLoss: nan (full log: /abs/ray_results/s/train_trial_1/error.txt)",
        "t00 failed, retried from its last checkpoint (1 of 1): NonFiniteLoss: nan "
        "(full log: s3://bucket/studies/s/train_trial_1/error.txt)",
    ]


def start_study(tmp_path: Path, name: str, trials: int = TRIALS, concurrent: int = 1) -> subprocess.Popen:
    args = study_args(tmp_path, name, "--trials", str(trials), "--max-concurrent", str(concurrent))
    return subprocess.Popen(
        [sys.executable, str(ROOT / "search" / "run.py"), *args],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def wait_for_first_epoch(process: subprocess.Popen, timeout: float = 300, started: int = 1) -> str:
    """The study's output up to its first epoch line, once `started` trials have started (on a busy machine the
    second of two trials at once can start after the first one's first epoch)."""
    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        seen.append(line)
        epochs = any(" epoch  1/" in earlier for earlier in seen)
        if epochs and sum(" started" in earlier for earlier in seen) >= started:  # t00's "started (recipe):" too
            return "".join(seen)
        if not line and process.poll() is not None:
            break
    process.kill()
    pytest.fail("the study reported no epoch:\n" + "".join(seen)[-3000:])


def assert_resumed_completely(tmp_path: Path, name: str, trials: int = TRIALS) -> None:
    result = run_script("run.py", *study_args(tmp_path, name, "--resume"), cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    client, parents, children = study_runs(tmp_path, name)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    # A trial Ray had not saved when killed is drawn again; its old run survives only if it logged epochs.
    lost = [c for c in children if c.data.tags["trial_status"] == "lost"]
    assert all(c.info.status == "KILLED" and c.data.metrics for c in lost)
    children = [c for c in children if c not in lost]
    assert len(children) == trials  # one child per trial: no duplicates after resuming
    for child in children:
        assert child.info.status in ("FINISHED", "FAILED")
        assert child.data.tags["trial_status"] in ("completed", "pruned", "failed")
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "val_acc")]
        assert steps == sorted(set(steps)) and steps[0] == 1  # metrics continue, none repeated
        won = ", best" if child.data.tags["trial"] == parents[0].data.tags["best_trial"] else ""  # the winner's
        assert child.info.run_name == f"{child.data.tags['trial']} {child.data.tags['trial_status']}{won}"
    parent = parents[0]
    assert "best_val_acc" in parent.data.metrics
    # The resumed study explains itself from all its trials, and Optuna holds each trial once, told once.
    assert f"{len(children)} trials:" in parent.data.tags["mlflow.note.content"]
    assert parent.data.metrics["elapsed_s"] > 0
    assert_optuna_matches(tmp_path, name, children)


def assert_optuna_matches(tmp_path: Path, name: str, children: list) -> None:
    """The Optuna database beside the store: every trial ended, and MLflow's trials told with their outcome."""
    import optuna

    study = optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path}/optuna.db")
    states = {t.user_attrs.get("ray_trial_id"): t.state.name for t in study.trials}
    assert "RUNNING" not in states.values()  # those asked after Ray's last snapshot are settled as FAIL
    outcomes = {"completed": "COMPLETE", "pruned": "PRUNED", "failed": "FAIL"}
    assert {c.data.tags["ray_trial_id"]: outcomes[c.data.tags["trial_status"]] for c in children}.items() <= (
        states.items()
    )


def interrupt_after_first_epoch(tmp_path: Path, name: str, **study) -> str:
    """Start a study and press Ctrl-C once it reports its first epoch with all its trials at once started; its
    output, having exited with 130."""
    process = start_study(tmp_path, name, **study)
    wait_for_first_epoch(process, started=study.get("concurrent", 1))
    process.send_signal(signal.SIGINT)
    output = process.communicate(timeout=300)[0]
    assert process.returncode == 130, output[-3000:]
    return output


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_and_the_study_resumes(tmp_path):
    output = interrupt_after_first_epoch(tmp_path, "interrupted")
    assert "--resume" in output and "Traceback" not in output
    _, parents, children = study_runs(tmp_path, "interrupted")
    assert [r for r in parents + children if r.info.status == "RUNNING"] == []
    other_model = run_script("run.py", *study_args(tmp_path, "interrupted", "--resume"), "--model", "cnn", cwd=tmp_path)
    assert other_model.returncode == 2 and "searched --model vit" in other_model.stderr
    assert_resumed_completely(tmp_path, "interrupted")


def test_ctrl_c_in_the_last_wave_interrupts_the_study_rather_than_finishing_it(tmp_path):
    """Every trial running when Ctrl-C comes: Ray stops them all and returns as if done; the study is not."""
    output = interrupt_after_first_epoch(tmp_path, "last-wave", trials=2, concurrent=2)
    assert "Study last-wave interrupted" in output and "Best trial" not in output
    assert "Tuner.restore" not in output and "WARNING" not in output, output  # Tune's advice is not this tool's
    _, parents, children = study_runs(tmp_path, "last-wave")
    assert [p.info.status for p in parents] == ["KILLED"]
    assert sorted(c.data.tags["trial_status"] for c in children) == ["interrupted", "interrupted"]
    assert sorted(c.info.run_name for c in children) == ["t00 interrupted", "t01 interrupted"]
    assert_resumed_completely(tmp_path, "last-wave", trials=2)


def test_a_full_disk_under_the_storage_path_is_one_line_and_a_resume_command(tmp_path):
    """A 30 MB disk for Ray's trial folders: the first checkpoint (ViT-Tiny with AdamW, 66 MB) cannot be written."""
    with mounted_tmpfs(tmp_path / "ray", megabytes=30):
        result = run_script("run.py", *study_args(tmp_path, "full", "--trials", "2", "--epochs", "1"), cwd=tmp_path)
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    ours = [line for line in result.stderr.splitlines() if line.startswith("search/run.py: error: ")]
    assert len(ours) == 1 and f"the disk under --storage-path {tmp_path / 'ray'} is full" in ours[0]
    assert result.stderr.rstrip().endswith(ours[0])  # the last word, not a traceback after it
    assert "stopped on a full disk" in result.stdout and "--name full --resume" in result.stdout
    _, parents, children = study_runs(tmp_path, "full")
    assert [p.info.status for p in parents] == ["FAILED"]
    assert all(c.info.status == "FAILED" and "No space left" in c.data.tags["failure"] for c in children)


@pytest.mark.slow
def test_a_killed_study_resumes(tmp_path):
    process = start_study(tmp_path, "killed")
    wait_for_first_epoch(process)
    time.sleep(3)  # let Ray write its experiment state after the first checkpoint
    process.kill()
    process.wait()
    assert_resumed_completely(tmp_path, "killed")


RESUME_ERRORS = {
    "unknown study": (["--model", "vit", "--name", "nope", "--resume"], "no study named 'nope'"),
    "no name": (["--model", "vit", "--resume"], "--resume needs --name"),
}


@pytest.mark.parametrize("case", RESUME_ERRORS, ids=list(RESUME_ERRORS))
def test_resume_refuses_what_it_cannot_continue(tmp_path, case, monkeypatch, capsys):
    from search.run import main

    args, message = RESUME_ERRORS[case]
    answer = call_main(main, *args, cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert message in one_line_refusal(answer, "run.py")
    assert not (tmp_path / "mlflow").exists()


def test_runs_of_trials_ray_never_saved_are_settled(tmp_path):
    """After a resume, children whose trial Ray does not know: empty ones go, ones with epochs stay as lost."""
    from mlflow.entities import ViewType

    from search.tracking.schema import PARENT_TAG, STATUS_TAG, TRIAL_ID_TAG
    from search.tracking.store import mlflow_client, settle_lost_children

    client = mlflow_client(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.create_experiment("settle")
    parent = client.create_run(experiment).info.run_id

    def child(trial_id: str, epochs: int) -> str:
        run_id = client.create_run(
            experiment, tags={PARENT_TAG: parent, TRIAL_ID_TAG: trial_id, STATUS_TAG: "running"}
        ).info.run_id
        for epoch in range(1, epochs + 1):
            client.log_metric(run_id, "val_acc", 0.5, step=epoch)
        return run_id

    known, empty, started = child("known", 2), child("never-saved", 0), child("saved-late", 1)
    settle_lost_children(client, experiment, parent, {"known"})

    active = {r.info.run_id for r in client.search_runs([experiment], run_view_type=ViewType.ACTIVE_ONLY)}
    assert empty not in active and client.get_run(empty).info.lifecycle_stage == "deleted"
    assert client.get_run(known).data.tags[STATUS_TAG] == "running" and known in active
    lost = client.get_run(started)
    assert lost.info.status == "KILLED" and lost.data.tags[STATUS_TAG] == "lost"
    assert [m.step for m in client.get_metric_history(started, "val_acc")] == [1]
