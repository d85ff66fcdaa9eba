"""--address: a study joins a running Ray cluster (token authentication on) instead of starting its own Ray."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
from helpers import ROOT, run_script

STUDY = ("--model", "vit", "--trials", "2", "--epochs", "1", "--smoke", "--data", "synthetic:3", "--no-pretrained")


def without_token(home) -> dict:
    """An environment with no Ray token anywhere: an empty home, no RAY_AUTH_TOKEN(_PATH)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS")}
    return {**env, "HOME": str(home)}


@pytest.mark.parametrize("how", ["flag", "environment"])
def test_joining_a_cluster_without_its_token_is_one_line_exit_2_and_nothing_written(tmp_path, how):
    shutil.copytree(ROOT / "spaces", tmp_path / "spaces")
    env = without_token(tmp_path / "home")
    address = ["--address", "10.0.0.7:6379"] if how == "flag" else []
    if how == "environment":
        env["RAY_ADDRESS"] = "10.0.0.7:6379"  # as Ray reads it
    result = run_script("run.py", *STUDY, *address, cwd=tmp_path, env=env, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert "--address 10.0.0.7:6379: the Ray cluster asks for its auth token" in line
    assert "~/.ray/auth_token from the head node" in line
    assert not (tmp_path / "mlflow").exists() and not (tmp_path / "ray_results").exists()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_studies_run_on_a_running_cluster_and_leave_it_running(tmp_path):
    """A head started as a user starts one (`ray start --head`, token authentication on), on loopback."""
    token = uuid.uuid4().hex  # the cluster's token, given to it and to the drivers alike
    env = {**without_token(tmp_path / "home"), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    port = free_port()
    log = tmp_path / "head.log"
    ray_folder = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # Ray's socket paths must stay under 108 bytes
    with log.open("w") as output:
        head = subprocess.Popen(
            [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block", "--port", str(port),
             "--num-cpus", "2", "--include-dashboard", "false", "--disable-usage-stats", "--node-ip-address",
             "127.0.0.1", "--temp-dir", ray_folder],
            stdout=output, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while "block forever" not in log.read_text():  # printed once the head runs
            assert head.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.5)
        shutil.copytree(ROOT / "spaces", tmp_path / "spaces")
        for name in ("joined", "again"):  # the second study finds the cluster the first one used still up
            result = run_script(
                "run.py", *STUDY, "--name", name, "--address", f"127.0.0.1:{port}", cwd=tmp_path, env=env
            )
            assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
            assert f"Study {name}: 2 trials: 2 completed" in result.stdout
    finally:
        if head.poll() is None:
            os.killpg(head.pid, signal.SIGTERM)  # --block: stopping it stops its cluster
            head.wait(timeout=60)
        shutil.rmtree(ray_folder, ignore_errors=True)
