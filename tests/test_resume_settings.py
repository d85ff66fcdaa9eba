"""--resume refuses a setting flag that differs from the study's record, in one line, as compare.py does; the flags
it takes (where this machine keeps things, --trials to extend) stay accepted. In-process: run.py's main."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import ROOT, study_config
from helpers.cli import call_main, one_line_refusal

from search.cli import given_options
from search.run import build_parser, main

NAME = "cut"


@pytest.fixture
def recorded(tmp_path: Path):
    """A study's parent run with its study.yaml and its Ray folder (no Optuna study: what --resume checks after
    the settings, so a resume that gets past them is refused for that instead). Its command-line flags."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    config = study_config(name=NAME, storage_path=str(tmp_path / "ray"), optuna_storage=f"sqlite:///{tmp_path}/o.db")
    client = MlflowClient(uri)
    experiment = client.create_experiment("cnn", artifact_location=(tmp_path / "artifacts").as_uri())
    parent = client.create_run(experiment, run_name=NAME, tags={"study": NAME, "model": "cnn"}).info.run_id
    client.log_text(parent, config.to_yaml(), "study.yaml")
    client.set_terminated(parent, "KILLED")
    (tmp_path / "ray" / NAME).mkdir(parents=True)
    (tmp_path / "ray" / NAME / "tuner.pkl").write_bytes(b"an interrupted study's trial state")
    where = ["--tracking-uri", uri, "--storage-path", str(tmp_path / "ray")]
    return ["--model", "cnn", "--name", NAME, "--resume", *where]


@pytest.fixture
def resumed(monkeypatch, capsys):
    """run.py --resume, refused: its one line (the environment run.py sets is put back afterwards)."""

    quiet = {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}  # --verbose would show MLflow's bar reading study.yaml

    def refused(argv: list[str]) -> str:
        answer = call_main(main, *argv, cwd=ROOT, monkeypatch=monkeypatch, capsys=capsys, env=quiet)
        return one_line_refusal(answer, "run.py")

    return refused


def test_a_changed_setting_is_refused_naming_each_in_one_line(recorded, resumed):
    line = resumed([*recorded, "--metric", "val_loss", "--no-amp", "--epochs", "5", "--data", "synthetic"])
    assert line == (
        f"search/run.py: error: study '{NAME}' ran with other settings: metric val_acc (now val_loss), "
        "epochs 3 (now 5), amp True (now False); --resume continues it with its own: leave those flags out, "
        "or start a new study with another --name"
    )


@pytest.mark.parametrize(
    "flags, setting",
    [
        (["--no-pretrained"], "pretrained True (now False)"),
        (["--no-recipe"], "recipe True (now False)"),
        (["--confirm", "2"], "confirm 0 (now 2)"),  # only an extension may change it
        (["--max-concurrent", "4"], "max_concurrent 1 (now 4)"),
        (["--fidelity", "resolution"], "fidelity epochs (now resolution)"),
        (["--space", str(ROOT / "spaces" / "vit.yaml")], "space "),
    ],
)
def test_each_kind_of_setting_flag_is_compared(recorded, resumed, flags, setting):
    assert setting in resumed([*recorded, *flags])


def test_the_flags_resume_takes_and_repeated_settings_pass(recorded, resumed, tmp_path):
    same = ["--trials", "3", "--metric", "val_acc", "--epochs", "3", "--amp", "--gpus-per-trial", "auto"]
    here = ["--cache-dir", str(tmp_path / "cache"), "--weights", "vit_tiny_patch16_224=w.safetensors"]
    line = resumed([*recorded, *same, *here, "--verbose"])
    assert "no longer holds study 'cut'" in line  # the check after the settings': they passed


def test_given_options_are_the_flags_written_not_the_defaults():
    argv = ["--model", "cnn", "--resume", "--no-amp", "--weights", "a=b", "--data", "data"]
    assert given_options(build_parser(), argv) == {"model", "resume", "amp", "weights", "data"}
