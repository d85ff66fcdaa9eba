"""--storage-path as Ray Tune takes it: a folder or a URI (S3 on a moto server on 127.0.0.1 here).

The fast tests check the storage module and run.py's one-line refusals; the slow one runs
a study in a bucket, stops it with Ctrl-C, resumes it and retrains its winner.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from helpers import free_port, interrupted_study, run_script
from helpers.servers import http_server

from search.errors import UsageError
from search.records import location
from search.study import storage

BUCKET = "studies"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
STUDY = ("--model", "vit", "--trials", "2", "--epochs", "2", "--smoke", "--data", "synthetic:3", "--no-pretrained")


@contextmanager
def moto_server(**env: str) -> Iterator[str]:
    """moto's S3 in a process of its own on 127.0.0.1 (env: e.g. INITIAL_NO_AUTH_ACTION_COUNT=0 checks keys);
    its endpoint URL."""
    executable = shutil.which("moto_server", path=str(Path(sys.executable).parent))
    if executable is None:
        pytest.skip("moto[server] is not installed (pip install -e '.[dev]')")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [executable, "-H", "127.0.0.1", "-p", str(port)]
    with http_server(command, f"{url}/moto-api/", "moto_server", within=30, env={**os.environ, **env}, interval=0.1):
        yield url


def create_bucket(endpoint: str, bucket: str) -> None:
    from pyarrow.fs import S3FileSystem

    S3FileSystem(
        endpoint_override=endpoint,
        access_key=CREDENTIALS["AWS_ACCESS_KEY_ID"],
        secret_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        region=CREDENTIALS["AWS_DEFAULT_REGION"],
        allow_bucket_creation=True,
    ).create_dir(bucket)


@pytest.fixture(scope="module")
def s3():
    """An S3 endpoint with the bucket BUCKET; its URL."""
    with moto_server() as url:
        create_bucket(url, BUCKET)
        yield url


@pytest.fixture
def aws(monkeypatch):
    """This process's S3 settings, as a user sets them: credentials and region (the endpoint per test)."""
    for key, value in CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    return monkeypatch


def refusal(storage_path: str) -> str:
    with pytest.raises(UsageError) as refused:
        storage.check_storage(storage_path)
    message = str(refused.value)
    assert "\n" not in message and message.startswith("--storage-path")
    return message


# ---------------------------------------------------------------- fast


def test_a_folder_is_taken_as_its_absolute_path_and_a_uri_as_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.resolved("ray_results") == str(tmp_path / "ray_results")
    assert storage.resolved(f"file://{tmp_path}/a/../b") == str(tmp_path / "b")
    assert storage.resolved("s3://bucket/prefix/") == "s3://bucket/prefix"
    assert not location.is_uri("C:/ray_results") and location.is_uri("gs://bucket")
    # A study's folder goes before the URI's options, as Ray's own URI joins them.
    assert location.join("s3://b/p?endpoint_override=h:9000&scheme=http", "study", "best") == (
        "s3://b/p/study/best?endpoint_override=h:9000&scheme=http"
    )
    assert location.join("s3://bucket", "study") == "s3://bucket/study"
    assert location.join("/data/ray", "study") == "/data/ray/study"


def test_a_folder_is_read_and_written_where_it_is(tmp_path):
    root = str(tmp_path / "ray")
    storage.check_storage(root)  # a folder passes: Ray creates it
    assert not storage.exists(root, "study")
    storage.write_text("a: 1\n", root, "study", "study.yaml")
    assert storage.exists(root, "study") and storage.read_text(root, "study", "study.yaml") == "a: 1\n"
    with storage.staged(root, "study", "best") as folder:  # written in place, no copy
        assert folder == tmp_path / "ray" / "study" / "best"


def test_an_unknown_scheme_or_a_secret_in_the_uri_is_refused_in_one_line():
    assert "knows no foo:// storage; give a folder, or a URI such as s3://" in refusal("foo://bucket/studies")
    with pytest.raises(UsageError, match=r"keep secret_key out of the URI.*AWS_SECRET_ACCESS_KEY"):
        storage.check_storage("s3://bucket/studies?endpoint_override=h:1&secret_key=hunter2")


def test_an_endpoint_that_does_not_answer_is_one_line_within_seconds(aws):
    closed = f"http://127.0.0.1:{free_port()}"
    aws.setenv("AWS_ENDPOINT_URL", closed)
    start = time.monotonic()
    message = refusal(f"s3://{BUCKET}/studies")
    assert f"no storage answers at {closed}" in message and "AWS_ENDPOINT_URL" in message
    with socket.socket() as silent:  # accepts, never answers: the request times out
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        aws.setattr(storage, "TIMEOUT_S", 1)
        aws.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{silent.getsockname()[1]}")
        assert "no storage answers" in refusal(f"s3://{BUCKET}/studies")
    assert time.monotonic() - start < 10


def test_a_bucket_is_read_and_written_through_the_endpoint_given(s3, aws):
    aws.setenv("AWS_ENDPOINT_URL", s3)
    root = f"s3://{BUCKET}/module"
    storage.check_storage(root)
    assert not storage.exists(root, "study")
    storage.write_text("a: 1\n", root, "study", "study.yaml")
    with storage.staged(root, "study", "best") as folder:  # a local folder, uploaded at the end
        (folder / "best_config.yaml").write_text("b: 2\n")
    assert storage.exists(root, "study") and storage.read_text(root, "study", "best", "best_config.yaml") == "b: 2\n"
    # The endpoint in the URI instead of the environment: pyarrow's own option, which Ray keeps too.
    aws.delenv("AWS_ENDPOINT_URL")
    in_uri = f"{root}?endpoint_override={s3.removeprefix('http://')}&scheme=http"
    assert storage.read_text(in_uri, "study", "study.yaml") == "a: 1\n"
    assert "bucket 'missing' does not exist at" in refusal(in_uri.replace(BUCKET, "missing"))
    assert not [path for path in listing(s3, BUCKET) if ".storage-check-" in path]  # the write probe cleaned up


def test_credentials_the_endpoint_refuses_are_one_line(aws):
    with moto_server(INITIAL_NO_AUTH_ACTION_COUNT="0") as checking:  # moto checks keys: ours are unknown
        aws.setenv("AWS_ENDPOINT_URL", checking)
        message = refusal(f"s3://{BUCKET}/studies")
    assert f"{checking} refused this machine's credentials (ACCESS_DENIED)" in message
    assert "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in message


def test_run_refuses_a_missing_bucket_before_anything_is_written(s3, tmp_path):
    env = {**CREDENTIALS, "AWS_ENDPOINT_URL": s3}
    result = run_script("run.py", *STUDY, "--storage-path", "s3://missing/studies", cwd=tmp_path, env=env)
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stderr.splitlines() == [
        f"search/run.py: error: --storage-path s3://missing/studies: bucket 'missing' does not exist at {s3}: "
        f"create it (e.g. aws s3 mb s3://missing), or name one that exists"
    ]
    assert list(tmp_path.iterdir()) == []  # no MLflow store, no Optuna database, no image cache


def test_a_uri_with_an_mlflow_server_needs_an_optuna_database():
    from search.run import build_parser
    from search.study.config import new_config

    args = [*STUDY, "--name", "x", "--storage-path", "s3://b/p", "--tracking-uri", "http://127.0.0.1:5000"]
    with pytest.raises(UsageError, match=r"give --optuna-storage sqlite:///PATH/optuna\.db"):
        new_config(build_parser().parse_args(args))
    config = new_config(build_parser().parse_args([*args, "--optuna-storage", "sqlite:////tmp/optuna.db"]))
    assert config.storage_path == "s3://b/p" and config.experiment_location == "s3://b/p/x"
    beside = new_config(build_parser().parse_args([*args[:-1], "sqlite:////tmp/store/mlflow.db"]))
    assert beside.optuna_storage == "sqlite:////tmp/store/optuna.db"


# ---------------------------------------------------------------- slow


def listing(endpoint: str, prefix: str) -> list[str]:
    """Every object under a bucket's prefix, by its key."""
    from pyarrow.fs import FileSelector, FileType, S3FileSystem

    fs = S3FileSystem(
        endpoint_override=endpoint,
        access_key=CREDENTIALS["AWS_ACCESS_KEY_ID"],
        secret_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        region=CREDENTIALS["AWS_DEFAULT_REGION"],
    )
    return [info.path for info in fs.get_file_info(FileSelector(prefix, recursive=True)) if info.type == FileType.File]


@pytest.mark.slow
def test_a_study_in_a_bucket_stops_resumes_and_retrains(s3, tmp_path):
    name, where = "in-s3", f"s3://{BUCKET}/runs"
    env = {**os.environ, **CREDENTIALS, "AWS_ENDPOINT_URL": s3, "PYTHONUNBUFFERED": "1"}
    args = [*STUDY, "--name", name, "--storage-path", where, "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"]

    # Ctrl-C once the first trial has reported its first epoch: the resume command names the bucket.
    code, output = interrupted_study(*args, marker=" epoch  1/2", cwd=tmp_path, env=env)
    assert code == 130, output[-3000:]
    assert f"--name {name} --resume --storage-path {where}" in output

    taken = run_script("run.py", *args, cwd=tmp_path, env=env)
    assert taken.returncode == 2 and f"exists already under --storage-path {where}" in taken.stderr

    resumed = run_script("run.py", *args, "--resume", cwd=tmp_path, env=env)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"Checkpoint: {where}/{name}/best/best_model.pt" in resumed.stdout

    stored = [path.removeprefix(f"{BUCKET}/runs/{name}/") for path in listing(s3, f"{BUCKET}/runs/{name}")]
    assert {"tuner.pkl", "study.yaml", "best/best_config.yaml", "best/best_model.pt"} <= set(stored)
    assert sum(path.endswith("/checkpoint.pt") for path in stored) >= 2  # one per trial, each kept once
    assert not (tmp_path / "ray_results").exists() and not (Path.home() / "ray_results" / name).exists()

    # The winner, read back through MLflow, retrains without the bucket.
    retrained = run_script(
        "final.py", "--study", name, "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", "--no-pretrained",
        "--out", str(tmp_path / "final"), cwd=tmp_path, env=env,
    )  # fmt: skip
    assert retrained.returncode == 0, retrained.stdout[-3000:] + retrained.stderr[-3000:]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("vit").experiment_id], f"tags.study = '{name}'")
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags and "role" not in r.data.tags]
    (final,) = [r for r in runs if r.data.tags.get("role") == "final"]
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.info.status == "FINISHED" and final.info.status == "FINISHED"
    # Ray restored the interrupted trials from the bucket: still two, each with its epochs once.
    assert len(trials) == 2 and all(r.info.status == "FINISHED" for r in trials)
    for trial in trials:
        assert [m.step for m in client.get_metric_history(trial.info.run_id, "val_acc")] == [1, 2]
    assert parent.data.params["storage_path"] == where
    assert "best" in {item.path for item in client.list_artifacts(parent.info.run_id)}
