"""A study's Ray is its own, and it listens on loopback only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

# Started in a child process, as run.py starts it: a task and an actor make Ray start its workers too.
PROBE = """
import json, sys, ray
from search.study.driver import start_ray
start_ray()
@ray.remote
def one():
    return 1
@ray.remote
class Keeper:
    def ping(self):
        return 1
keeper = Keeper.remote()
assert ray.get([one.remote(), keeper.ping.remote()]) == [1, 1]
sys.path.insert(0, sys.argv[1])
from local_ray_sockets import listening_sockets_of_tree
print(json.dumps(listening_sockets_of_tree(__import__("os").getpid())))
ray.shutdown()
"""


def run_probe(ray_tmpdir: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_TMPDIR": ray_tmpdir}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(
        [sys.executable, "-c", PROBE, str(Path(__file__).parent / "helpers")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


@pytest.fixture
def ray_tmpdir():
    """Ray's temporary folder for this test alone (short: Ray's socket paths must stay under 108 characters)."""
    with tempfile.TemporaryDirectory(dir="/tmp", prefix="rt") as folder:
        yield folder


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads sockets from /proc (Linux)")
def test_every_ray_process_of_a_study_listens_on_loopback_only(ray_tmpdir):
    result = run_probe(ray_tmpdir)
    assert result.returncode == 0, result.stderr[-3000:]
    sockets = json.loads(result.stdout.strip().splitlines()[-1])
    names = {name for name, _ in sockets}
    assert {"gcs_server", "raylet"} <= names, sockets  # the probe sees Ray's own servers
    assert [s for s in sockets if not s[1].startswith(("127.", "::1", "::ffff:127."))] == []


def test_a_stale_local_cluster_file_does_not_capture_the_study(ray_tmpdir):
    """`ray start --head` killed without `ray stop` leaves this file; ray.init() would try to join it."""
    Path(ray_tmpdir, "ray", "ray_current_cluster").parent.mkdir()
    Path(ray_tmpdir, "ray", "ray_current_cluster").write_text("127.0.0.1:6379")
    result = run_probe(ray_tmpdir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "When connecting to an existing cluster" not in result.stderr


def test_tune_s_own_log_lines_are_heard_with_verbose_only():
    """Without --verbose a failed trial is the study's one line (not Tune's ERROR and traceback) and Ctrl-C its
    resume command (not Tune's WARNINGs advising Tuner.restore); Tune's wait for resources is heard always."""
    import logging

    from search.study.driver import quiet_tune_logs

    def heard(logger: str, level: int) -> bool:
        return logging.getLogger(logger).isEnabledFor(level)

    try:
        quiet_tune_logs(verbose=False)
        assert not heard("ray.tune.execution.tune_controller", logging.ERROR)  # "Trial task failed" + traceback
        assert not heard("ray.tune.tune", logging.WARNING)  # "Resume experiment with: Tuner.restore(...)"
        assert heard("ray.tune.execution.insufficient_resources_manager", logging.WARNING)
    finally:
        quiet_tune_logs(verbose=True)
    assert heard("ray.tune.execution.tune_controller", logging.ERROR) and heard("ray.tune.tune", logging.WARNING)
