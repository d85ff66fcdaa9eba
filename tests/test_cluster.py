"""--address: a study joins a running Ray cluster (token authentication on or off) instead of starting its own Ray."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import ROOT, free_port, run_script
from helpers.servers import stop_process_group, wait_until

STUDY = ("--model", "vit", "--trials", "2", "--epochs", "1", "--smoke", "--data", "synthetic:3", "--no-pretrained")
STUDY_ON_CPUS = (*STUDY, "--gpus-per-trial", "0")


def without_token(home) -> dict:
    """An environment with no Ray token anywhere: an empty home, no RAY_AUTH_TOKEN(_PATH), no RAY_AUTH_MODE."""
    dropped = ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS", "RAY_AUTH_MODE")
    return {**{k: v for k, v in os.environ.items() if k not in dropped}, "HOME": str(home)}


def test_a_driver_joins_with_a_token_where_it_has_one_and_without_where_it_has_none(tmp_path, monkeypatch):
    """RAY_AUTH_MODE as run.py sets it: a driver in token mode without a token would refuse itself before asking
    a cluster that may not want one (`ray start --head` with Ray's defaults and no token runs without)."""
    from search.study.cluster import auth_environment, token_refused

    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert auth_environment(None) == {"RAY_AUTH_MODE": "token"}  # the private Ray: Ray makes its token
    assert auth_environment("10.0.0.7:6379") == {"RAY_AUTH_MODE": "disabled"}
    assert token_refused("10.0.0.7:6379") == (
        f"--address 10.0.0.7:6379: the Ray cluster asks for its auth token and this machine has none: copy "
        f"~/.ray/auth_token from the head node to {tmp_path}/.ray/auth_token (or set RAY_AUTH_TOKEN; "
        f"`ray get-auth-token` on the head prints it)"
    )
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("a" * 32)
    assert auth_environment("10.0.0.7:6379") == {"RAY_AUTH_MODE": "token"}
    assert "refused this machine's auth token" in token_refused("10.0.0.7:6379")


RAY = str(Path(sys.executable).with_name("ray"))
NODE = ("--block", "--num-cpus", "1", "--disable-usage-stats", "--node-ip-address", "127.0.0.1")
"""One CPU per node: two trials at once land one on each node."""


def start_node(arguments: list[str], env: dict, log: Path) -> subprocess.Popen:
    """`ray start ... --block` in a session of its own (killing that session stops the node), once it runs."""
    with log.open("w") as output:
        node = subprocess.Popen(
            [RAY, "start", *NODE, *arguments], stdout=output, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    wait_until(lambda: "block forever" in log.read_text(), node, "ray start", within=120, log=log)  # once it runs
    return node


def stop_node(node: subprocess.Popen, signal_number: int = signal.SIGTERM) -> None:
    if node.poll() is None:
        # --block: stopping it stops its node. A head whose worker node is gone can take half a minute: SIGKILL then.
        stop_process_group(node, first=signal_number, grace=10)


def power_off(node: subprocess.Popen, ray_folder: str) -> None:
    """Every process of a node killed at once, as when its machine dies. Not all are in the process group of
    `ray start`: its workers, renamed ray::..., are known by RAY_RAYLET_PID, their raylet's process id, and one
    left alive would finish its trial before it noticed."""
    named = {pid for pid, cmdline, _ in processes() if ray_folder.encode() in cmdline}  # raylet and helpers
    workers = {pid for pid, _, environ in processes() if any(b"RAY_RAYLET_PID=%d" % n in environ for n in named)}
    os.killpg(node.pid, signal.SIGKILL)
    for pid in named | workers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    node.wait(timeout=60)


def processes() -> list[tuple[int, bytes, bytes]]:
    """(pid, command line, environment) of each process there is."""
    found = []
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if entry.name.isdigit():
                found.append((int(entry.name), (entry / "cmdline").read_bytes(), (entry / "environ").read_bytes()))
    return found


@dataclass
class TwoNodes:
    address: str
    env: dict
    """What a driver needs: the cluster's token, and no other token or address."""
    worker: subprocess.Popen
    worker_id: str
    """The worker node's Ray node id."""
    worker_folder: str
    """The worker node's --temp-dir, which each of its processes names on its command line."""


def gpu_node_id(address: str, env: dict) -> str:
    """The id of the cluster's node that declares a GPU, as a driver of the cluster sees it."""
    script = (
        f"import ray; ray.init(address={address!r}, logging_level=40); "
        "print(*[n['NodeID'] for n in ray.nodes() if n['Alive'] and n['Resources'].get('GPU')])"
    )
    found = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert found.returncode == 0, found.stderr[-2000:]
    return found.stdout.split()[-1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Two Ray nodes on loopback, started as a user starts them (token authentication on), one CPU each.
    The worker node declares a GPU that it does not have, for --gpus-per-trial auto to measure there."""
    folder = tmp_path_factory.mktemp("cluster")
    token = uuid.uuid4().hex  # the cluster's token, given to its nodes and to the drivers alike
    env = {**without_token(folder / "home"), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    address = f"127.0.0.1:{free_port()}"
    ray_folders = [tempfile.mkdtemp(prefix="ray-", dir="/tmp") for _ in range(2)]  # socket paths < 108 bytes
    head = start_node(
        ["--head", "--port", address.split(":")[1], "--include-dashboard", "false", "--temp-dir", ray_folders[0]],
        env, folder / "head.log",
    )  # fmt: skip
    try:
        worker = start_node(
            ["--address", address, "--num-gpus", "1", "--temp-dir", ray_folders[1]], env, folder / "worker.log"
        )
        try:
            yield TwoNodes(address, env, worker, gpu_node_id(address, env), ray_folders[1])
        finally:
            stop_node(worker)
    finally:
        stop_node(head)
        for ray_folder in ray_folders:
            shutil.rmtree(ray_folder, ignore_errors=True)


def project(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "spaces", tmp_path / "spaces")
    return tmp_path


def start_study(tmp_path: Path, address: str, env: dict, *arguments: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(ROOT / "search" / "run.py"), "--address", address, *arguments],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**env, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip


def read_until(process: subprocess.Popen, done, seen: list[str], timeout: float = 300) -> None:
    """Read the study's lines into `seen` until done(seen) holds."""
    assert process.stdout is not None
    deadline = time.monotonic() + timeout
    while not done(seen):
        line = process.stdout.readline()
        if (not line and process.poll() is not None) or time.monotonic() > deadline:
            process.kill()
            pytest.fail("the study ended or stalled early:\n" + "".join(seen)[-3000:])
        seen.append(line)


def finished(process: subprocess.Popen, seen: list[str]) -> str:
    output = "".join(seen) + process.communicate(timeout=600)[0]
    assert process.returncode == 0, output[-4000:]
    return output


def study_runs(tmp_path: Path, name: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow/mlflow.db")
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments, filter_string=f"tags.study = '{name}'")


def trial_runs(tmp_path: Path, name: str) -> list:
    return [run for run in study_runs(tmp_path, name) if "mlflow.parentRunId" in run.data.tags]


@pytest.mark.slow
def test_trials_land_on_both_nodes_and_never_read_the_driver_s_cache(cluster, tmp_path):
    """The decoded images reach the trials through Ray's object store: the driver's cache is deleted before
    the first trial starts, and every trial still trains, on one node or the other."""
    study = start_study(
        project(tmp_path), cluster.address, cluster.env,
        *STUDY_ON_CPUS, "--name", "spread", "--trials", "4", "--max-concurrent", "2",
    )  # fmt: skip
    seen: list[str] = []
    read_until(study, lambda lines: any(line.startswith("Data: ") for line in lines), seen)
    shutil.rmtree(tmp_path / ".cache" / "images")  # in the object store now; the trials must not need it
    output = finished(study, seen)
    assert "Study spread: 4 trials: 4 completed" in output
    runs = trial_runs(tmp_path, "spread")
    assert len(runs) == 4 and all(run.info.status == "FINISHED" for run in runs)
    nodes = [run.data.tags["ray_nodes"] for run in runs]
    assert all(len(node.split(",")) == 1 for node in nodes)  # nothing moved
    assert len(set(nodes)) == 2, nodes  # both nodes trained trials


@pytest.mark.slow
def test_a_second_study_finds_the_cluster_still_up(cluster, tmp_path):
    result = run_script(
        "run.py", *STUDY_ON_CPUS, "--name", "again", "--address", cluster.address, cwd=project(tmp_path),
        env=cluster.env,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Study again: 2 trials: 2 completed" in result.stdout


@pytest.mark.slow
def test_a_cluster_with_token_authentication_refuses_a_driver_without_its_token_in_one_line(cluster, tmp_path):
    """Asked, the cluster refuses: one line naming the fix, exit 2, nothing written (Ray's C++ client warns for
    20 s before it gives up; none of that reaches the terminal)."""
    env = without_token(tmp_path / "home")
    result = run_script(
        "run.py", *STUDY_ON_CPUS, "--name", "refused", "--address", cluster.address, cwd=project(tmp_path), env=env,
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(
        f"search/run.py: error: --address {cluster.address}: the Ray cluster asks for its auth token and this "
        f"machine has none: copy ~/.ray/auth_token from the head node to {tmp_path}/home/.ray/auth_token"
    )
    assert trial_runs(tmp_path, "refused") == [] and study_runs(tmp_path, "refused") == []
    assert not (tmp_path / "ray_results" / "refused").exists()


@pytest.mark.slow
def test_gpus_per_trial_auto_measures_on_a_gpu_node_of_the_cluster(cluster, tmp_path):
    """The driver's machine has no GPU; the cluster says the worker node has one. The probe runs there, as a
    task holding that GPU, and reports back what it found: no CUDA (the GPU is declared, not real)."""
    result = run_script(
        "run.py", *STUDY, "--name", "probed", "--address", cluster.address, cwd=project(tmp_path), env=cluster.env
    )
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("search/run.py: error: --gpus-per-trial auto could not measure the GPU (")
    assert "no CUDA GPU" in line
    assert trial_runs(tmp_path, "probed") == []


@pytest.mark.slow
def test_a_worker_node_lost_mid_trial_moves_the_trial_on_from_its_checkpoint(cluster, tmp_path):
    """Runs last: it kills the worker node. The trial that was training there fails once and, with
    --max-failures 1, continues on the head node from its last checkpoint; the study finishes whole."""
    study = start_study(
        project(tmp_path), cluster.address, cluster.env, *STUDY_ON_CPUS,
        "--name", "moved", "--epochs", "6", "--grace-period", "6", "--max-concurrent", "2", "--max-failures", "1",
        "--data", "synthetic",  # 11 classes: epochs long enough, and no early stop, to leave the kill a few epochs
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while not trained_on(tmp_path, "moved", cluster.worker_id):  # its trial has a checkpoint, and epochs to go
        assert study.poll() is None and time.monotonic() < deadline, "the worker node trained no trial"
        time.sleep(0.2)
    power_off(cluster.worker, cluster.worker_folder)
    output = finished(study, [])
    assert "Study moved: 2 trials: 2 completed" in output
    runs = trial_runs(tmp_path, "moved")
    assert all(run.info.status == "FINISHED" for run in runs)
    (moved,) = [run for run in runs if "," in run.data.tags["ray_nodes"]]
    assert len(set(moved.data.tags["ray_nodes"].split(","))) == 2
    from mlflow.tracking import MlflowClient

    history = MlflowClient(f"sqlite:///{tmp_path}/mlflow/mlflow.db").get_metric_history(moved.info.run_id, "val_acc")
    steps = sorted(m.step for m in history)
    assert steps == list(range(1, len(steps) + 1)) and len(steps) > 1  # each epoch once: continued, not restarted
    restarted_at = trial_results(tmp_path, "moved", moved.data.tags["ray_trial_id"])
    assert min(epoch for epoch, node in restarted_at if node == moved.data.tags["ray_nodes"].split(",")[1]) > 1


def trained_on(tmp_path: Path, name: str, node: str) -> bool:
    """Whether a trial of the study has reported an epoch trained on `node`, by Ray's result.json files."""
    for path in (tmp_path / "ray_results" / name).glob("*/result.json"):
        whole_lines = path.read_text().split("\n")[:-1]  # the last one may be half written
        if any(json.loads(line)["node_id"] == node for line in whole_lines):
            return True
    return False


def trial_results(tmp_path: Path, name: str, trial_id: str) -> list[tuple[int, str]]:
    """(epoch, node) of each result a trial reported, from Ray's own result.json."""
    (folder,) = (tmp_path / "ray_results" / name).glob(f"*{trial_id}*")
    results = [json.loads(line) for line in (folder / "result.json").read_text().splitlines()]
    return [(result["epoch"], result["node_id"]) for result in results]


@pytest.mark.slow
def test_a_driver_that_loses_its_cluster_says_so_and_resumes_once_it_is_back(tmp_path):
    """The head dies mid-study: one line and the resume command, the record closed as interrupted; the same
    command, once the head runs again, finishes the study."""
    token = uuid.uuid4().hex
    env = {**without_token(tmp_path / "home"), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    port = str(free_port())
    ray_folder = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    head_arguments = ["--head", "--port", port, "--include-dashboard", "false", "--temp-dir", ray_folder]
    head = start_node(head_arguments, env, tmp_path / "head.log")
    try:
        address = f"127.0.0.1:{port}"
        study = start_study(project(tmp_path), address, env, *STUDY_ON_CPUS, "--name", "lost", "--epochs", "4")
        seen: list[str] = []
        read_until(study, lambda lines: any(" epoch  1/4" in line for line in lines), seen)
        stop_node(head, signal.SIGKILL)
        output = "".join(seen) + study.communicate(timeout=120)[0]
        assert study.returncode == 1, output[-3000:]
        assert f"search/run.py: error: lost the Ray cluster at {address}: " in output
        (command,) = [line.strip() for line in output.splitlines() if line.startswith("  python search/run.py")]
        assert f"--address {address}" in command
        (parent,) = [run for run in study_runs(tmp_path, "lost") if "mlflow.parentRunId" not in run.data.tags]
        assert parent.info.status == "KILLED"

        head = start_node(head_arguments, env, tmp_path / "head-again.log")
        resumed = subprocess.run(
            [sys.executable, str(ROOT / "search" / "run.py"), *shlex.split(command)[2:]],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
        assert "Study lost: 2 trials: 2 completed" in resumed.stdout
    finally:
        stop_node(head)
        shutil.rmtree(ray_folder, ignore_errors=True)


@pytest.mark.slow
def test_a_cluster_started_with_ray_s_defaults_is_joined_without_a_token(tmp_path):
    """`ray start --head` on a machine with no token runs without authentication (its log says so); a driver with
    no token joins it, and the study runs. Nothing makes a token on the driver's machine."""
    ray_folder = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    port = str(free_port())
    head = start_node(
        ["--head", "--port", port, "--include-dashboard", "false", "--temp-dir", ray_folder],
        without_token(tmp_path / "head-home"), tmp_path / "head.log",
    )  # fmt: skip
    try:
        assert "Token authentication is disabled" in (tmp_path / "head.log").read_text()
        home = tmp_path / "home"
        home.mkdir()
        result = run_script(
            "run.py", "--model", "vit", "--trials", "1", "--epochs", "1", "--smoke", "--img-size", "32",
            "--data", "synthetic:3", "--no-pretrained", "--gpus-per-trial", "0", "--name", "open",
            "--address", f"127.0.0.1:{port}", cwd=project(tmp_path), env=without_token(home), timeout=600,
        )  # fmt: skip
    finally:
        stop_node(head)
        shutil.rmtree(ray_folder, ignore_errors=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Study open: 1 trials: 1 completed" in result.stdout
    assert not (home / ".ray").exists()  # no ~/.ray/auth_token made
