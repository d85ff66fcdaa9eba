"""The command line answers fast and refuses bad input with one line, exit code 2, nothing written."""

import time
from pathlib import Path

import pytest
from helpers import mounted_tmpfs, run_script, write_image_folder

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


def test_help_lists_every_flag_with_defaults_in_under_two_seconds(tmp_path):
    start = time.perf_counter()
    result = run_script("run.py", "--help", cwd=tmp_path)
    elapsed = time.perf_counter() - start
    assert result.returncode == 0
    assert elapsed < 2.0, f"--help took {elapsed:.2f} s"
    for flag in FLAGS:
        assert flag in result.stdout
    assert "sqlite:///mlflow/mlflow.db" in result.stdout and "default: 30" in result.stdout


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
    "offline pretrained weights": (["--model", "vit"], "rerun with --no-pretrained"),
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


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_input_is_one_line_exit_2_and_no_mlflow_run(tmp_path, case):
    args, message = BAD[case]
    (tmp_path / "bad.yaml").write_text("parameters: {learning_rate: {type: float, low: 0.001, high: 0.1}}\n")
    (tmp_path / "nan.yaml").write_text("parameters: {lr: {type: float, low: .nan, high: 0.1}}\n")
    (tmp_path / "ray_results" / "taken").mkdir(parents=True)
    needs_data = "--data" not in args and case not in ("unknown model",)
    if needs_data:
        write_image_folder(tmp_path / "images", {"a": 4, "b": 4})
        args = [*args, "--data", "images"]
    if case == "gpus on a cpu machine":
        pytest.importorskip("torch")
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has a GPU")
    env = {key: value.format(tmp=tmp_path) for key, value in OFFLINE.items()}
    start = time.perf_counter()
    result = run_script("run.py", *args, cwd=tmp_path, env=env)
    elapsed = time.perf_counter() - start
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert message in lines[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "mlflow").exists()
    assert sorted(p.name for p in (tmp_path / "ray_results").iterdir()) == ["taken"]
    if "tracking" in case or "name" in case:
        assert elapsed < 5, f"refused after {elapsed:.1f} s"  # before torch, data or Ray


def test_a_name_used_by_a_study_in_mlflow_is_refused_before_anything_is_written(tmp_path):
    from search.tracking.schema import STUDY_TAG
    from search.tracking.store import mlflow_client

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = mlflow_client(uri)
    client.create_run(client.create_experiment("vit"), run_name="taken", tags={STUDY_TAG: "taken"})
    result = run_script(
        "run.py",
        "--model",
        "vit",
        "--smoke",
        "--data",
        "synthetic",
        "--no-pretrained",
        "--name",
        "taken",
        "--tracking-uri",
        uri,
        cwd=tmp_path,
    )
    assert result.returncode == 2 and "'taken' exists already in --tracking-uri" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert len(client.search_runs([e.experiment_id for e in client.search_experiments()])) == 1
    assert not (tmp_path / "ray_results").exists() and not (tmp_path / ".cache").exists()


def test_a_read_only_tracking_store_is_refused_at_once(tmp_path):
    """A read-only disk (a tmpfs mounted ro: root only) holding an existing store."""
    from search.tracking.store import mlflow_client

    mlflow_client(f"sqlite:///{tmp_path}/store/mlflow.db")
    with mounted_tmpfs(tmp_path / "ro", copy_from=tmp_path / "store", read_only=True) as read_only:
        result = run_script(
            "run.py",
            "--model",
            "vit",
            "--smoke",
            "--data",
            "synthetic",
            "--no-pretrained",
            "--tracking-uri",
            f"sqlite:///{read_only}/mlflow.db",
            cwd=tmp_path,
        )
    assert result.returncode == 2 and "Read-only file system" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


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
def test_unusable_data_is_one_line_exit_2_and_nothing_written(tmp_path, case):
    make_layout(tmp_path / "images", case)
    result = run_script("run.py", "--model", "cnn", "--data", "images", "--no-pretrained", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and DATA_PROBLEMS[case] in lines[0], result.stderr
    assert "images" in lines[0]  # names where
    assert not (tmp_path / "mlflow").exists() and not (tmp_path / ".cache").exists()
