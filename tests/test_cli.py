"""The command line answers fast and refuses bad input with one line, exit code 2, nothing written.

Refusals call run.py's main() in this process (tests/helpers/cli.py); one subprocess test keeps the
contract a user sees, and one probe process shows which refusals come before the heavy imports.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import mounted_tmpfs, run_script, write_image_folder
from helpers.cli import call_main, heavy_modules_loaded, one_line_refusal

from search.run import main

FLAGS = [
    "--model",
    "--trials",
    "--data",
    "--epochs",
    "--img-size",
    "--seed",
    "--space",
    "--gpus-per-trial",
    "--cpus-per-trial",
    "--max-concurrent",
    "--grace-period",
    "--reduction-factor",
    "--metric",
    "--name",
    "--storage-path",
    "--tracking-uri",
    "--experiment",
    "--no-pretrained",
    "--smoke",
]


def test_help_lists_every_flag_with_defaults(tmp_path, monkeypatch, capsys):
    answer = call_main(main, "--help", cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert answer.code == 0
    for flag in FLAGS:
        assert flag in answer.out
    assert "sqlite:///mlflow/mlflow.db" in answer.out and "default: 30" in answer.out


BAD = {
    "unknown model": (["--model", "resnet"], "invalid choice: 'resnet'"),
    "zero trials": (["--model", "cnn", "--trials", "0"], "--trials 0"),
    "zero epochs": (["--model", "cnn", "--epochs", "0"], "--epochs 0"),
    "gpu fraction above one": (["--model", "cnn", "--gpus-per-trial", "1.5"], "--gpus-per-trial 1.5"),
    "negative gpu fraction": (["--model", "cnn", "--gpus-per-trial", "-0.5"], "--gpus-per-trial -0.5"),
    "gpus on a cpu machine": (["--model", "cnn", "--gpus-per-trial", "0.5"], "no CUDA GPU is visible"),
    "image too small for the vit patch": (["--model", "vit", "--img-size", "40"], "multiple of the ViT patch"),
    "missing default data": (["--model", "cnn", "--data", "data"], "--data synthetic"),
    "missing space": (["--model", "cnn", "--space", "nope.yaml"], "nope.yaml does not exist"),
    "unknown space parameter": (["--model", "cnn", "--space", "bad.yaml"], "learning_rate: not a hyperparameter"),
    "missing weights file": (
        ["--model", "cnn", "--weights", "tf_efficientnetv2_s=missing.safetensors"],
        "missing.safetensors",
    ),
    "image size without bound": (["--model", "cnn", "--img-size", "4096"], "--img-size 4096: use 16 to 1024"),
    "synthetic set too large": (["--model", "cnn", "--data", "synthetic:10000000"], "2 <= C <= 1000"),
    "data is a file": (["--model", "cnn", "--data", "bad.yaml"], "is a file: pass the folder"),
    "name escaping the storage": (
        ["--model", "cnn", "--name", "../../escaped-study"],
        "--name '../../escaped-study': use",
    ),
    "name too long": (["--model", "cnn", "--name", "s" * 300], "use 1 to 100 letters"),
    "name with quotes": (["--model", "cnn", "--name", 'it\'s "x"'], "starting with a letter or digit"),
    "name of an existing ray folder": (
        ["--model", "cnn", "--name", "taken"],
        "'taken' exists already under --storage-path",
    ),
    "unknown tracking scheme": (["--model", "cnn", "--tracking-uri", "foo://bar"], "not a store MLflow opens"),
    "tracking server not answering": (
        ["--model", "cnn", "--tracking-uri", "http://127.0.0.1:1"],
        "no MLflow server answers",
    ),
    "tracking store under /proc": (
        ["--model", "cnn", "--tracking-uri", "sqlite:////proc/nope/m.db"],
        "cannot create files in /proc",
    ),
    "tracking store under a file": (
        ["--model", "cnn", "--tracking-uri", "sqlite:///bad.yaml/m.db"],
        "(Not a directory)",
    ),
    "tracking store that is no database": (
        ["--model", "cnn", "--tracking-uri", "sqlite:///bad.yaml"],
        "cannot be written as an SQLite",
    ),
    "space with a NaN bound": (["--model", "cnn", "--space", "nan.yaml"], "lr: 'low:' and 'high:' must be finite"),
}
# A hub that cannot be reached and an empty weights cache: offline, on any machine.
OFFLINE = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": "{tmp}/hf"}


def bad_input_folder(tmp_path: Path) -> None:
    """What the refusals of BAD refer to: a bad space file, one with a NaN bound, a study folder already taken."""
    (tmp_path / "bad.yaml").write_text("parameters: {learning_rate: {type: float, low: 0.001, high: 0.1}}\n")
    (tmp_path / "nan.yaml").write_text("parameters: {lr: {type: float, low: .nan, high: 0.1}}\n")
    (tmp_path / "ray_results" / "taken").mkdir(parents=True)


def with_data(tmp_path: Path, case: str, args: list[str]) -> list[str]:
    """`args`, with a small image folder as --data where the case gives none."""
    if "--data" in args or case == "unknown model":
        return args
    write_image_folder(tmp_path / "images", {"a": 4, "b": 4})
    return [*args, "--data", "images"]


def nothing_written(tmp_path: Path) -> None:
    assert not (tmp_path / "mlflow").exists()
    assert sorted(p.name for p in (tmp_path / "ray_results").iterdir()) == ["taken"]


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_input_is_one_line_exit_2_and_no_mlflow_run(tmp_path, case, monkeypatch, capsys):
    args, message = BAD[case]
    bad_input_folder(tmp_path)
    args = with_data(tmp_path, case, args)
    if case == "gpus on a cpu machine":
        pytest.importorskip("torch")
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has a GPU")
    answer = call_main(main, *args, cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert message in one_line_refusal(answer, "run.py")
    nothing_written(tmp_path)


def test_a_refusal_is_one_line_on_stderr_exit_2_without_a_traceback_from_the_command_line(tmp_path):
    """The contract as a user meets it, run.py in its own process: here, pretrained weights that cannot be
    downloaded (a hub that does not answer, which the hub's client reads from the environment once, at import)."""
    bad_input_folder(tmp_path)
    args = with_data(tmp_path, "offline pretrained weights", ["--model", "vit"])
    env = {key: value.format(tmp=tmp_path) for key, value in OFFLINE.items()}
    result = run_script("run.py", *args, cwd=tmp_path, env=env)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("search/run.py: error: ") and "rerun with --no-pretrained" in lines[0]
    assert "Traceback" not in result.stderr
    nothing_written(tmp_path)


def test_help_and_a_bad_name_or_tracking_store_answer_before_torch_mlflow_or_ray_load(tmp_path):
    """They answer at once: before the imports that take seconds (a timing said so once; a busy machine made it
    flaky)."""
    bad_input_folder(tmp_path)
    cases = [case for case in BAD if "tracking" in case or "name" in case]
    calls = [with_data(tmp_path, case, BAD[case][0]) for case in cases]
    assert heavy_modules_loaded("search.run", tmp_path, ["--help"], *calls) == [(0, [])] + [(2, [])] * len(cases)
    nothing_written(tmp_path)


def test_a_name_used_by_a_study_in_mlflow_is_refused_before_anything_is_written(tmp_path, monkeypatch, capsys):
    from search.tracking.schema import STUDY_TAG
    from search.tracking.store import mlflow_client

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = mlflow_client(uri)
    client.create_run(client.create_experiment("vit"), run_name="taken", tags={STUDY_TAG: "taken"})
    args = ("--model", "vit", "--smoke", "--data", "synthetic", "--no-pretrained", "--name", "taken")
    answer = call_main(main, *args, "--tracking-uri", uri, cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert "'taken' exists already in --tracking-uri" in one_line_refusal(answer, "run.py")
    assert len(client.search_runs([e.experiment_id for e in client.search_experiments()])) == 1
    assert not (tmp_path / "ray_results").exists() and not (tmp_path / ".cache").exists()


def test_a_read_only_tracking_store_is_refused_at_once(tmp_path, monkeypatch, capsys):
    """A read-only disk (a tmpfs mounted ro: root only) holding an existing store."""
    from search.tracking.store import mlflow_client

    mlflow_client(f"sqlite:///{tmp_path}/store/mlflow.db")
    with mounted_tmpfs(tmp_path / "ro", copy_from=tmp_path / "store", read_only=True) as read_only:
        args = ("--model", "vit", "--smoke", "--data", "synthetic", "--no-pretrained")
        uri = f"sqlite:///{read_only}/mlflow.db"
        answer = call_main(main, *args, "--tracking-uri", uri, cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert "Read-only file system" in one_line_refusal(answer, "run.py")


def make_layout(root: Path, case: str) -> Path:
    """Data folders that cannot be used, each in its own way."""
    if case == "empty folder":
        root.mkdir()
    elif case == "one class":
        write_image_folder(root, {"only": 6})
    elif case == "class without images":
        write_image_folder(root, {"a": 6, "b": 6})
        (root / "c").mkdir()
        (root / "c" / "notes.txt").write_text("no images here")
    elif case == "pre-split classes differ":
        write_image_folder(root / "train", {"a": 4, "b": 4})
        write_image_folder(root / "val", {"a": 2, "b": 2})
        write_image_folder(root / "test", {"a": 2, "c": 2})
    elif case == "too few images for a split":
        write_image_folder(root, {"a": 6, "b": 2})
    elif case == "pre-split without test":
        write_image_folder(root / "train", {"cat": 4, "dog": 4})
        write_image_folder(root / "val", {"cat": 2, "dog": 2})
    return root


DATA_PROBLEMS = {
    "empty folder": "has no class sub-folders",
    "one class": "holds one class (only)",
    "class without images": "has no images",
    "pre-split classes differ": "hold different classes",
    "too few images for a split": "class 'b' has 2 image(s)",
    "pre-split without test": "holds train/ and val/ but no test/: add test/",
}


@pytest.mark.parametrize("case", DATA_PROBLEMS, ids=list(DATA_PROBLEMS))
def test_unusable_data_is_one_line_exit_2_and_nothing_written(tmp_path, case, monkeypatch, capsys):
    make_layout(tmp_path / "images", case)
    args = ("--model", "cnn", "--data", "images", "--no-pretrained")
    line = one_line_refusal(call_main(main, *args, cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys), "run.py")
    assert DATA_PROBLEMS[case] in line
    assert "images" in line  # names where
    assert not (tmp_path / "mlflow").exists() and not (tmp_path / ".cache").exists()
