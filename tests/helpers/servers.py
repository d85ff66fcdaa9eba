"""Servers the tests start in processes of their own (mlflow server, moto's S3, mlflow models serve, ray start):
started in a session of their own, waited for until they answer, and stopped with everything they started."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


def log_tail(log: Path | None) -> str:
    """The end of a server's log, for a failure's message ('' without a log)."""
    return f":\n{log.read_text()[-3000:]}" if log is not None and log.exists() else ""


def wait_until(
    ready: Callable[[], bool],
    process: subprocess.Popen,
    what: str,
    within: float,
    log: Path | None = None,
    interval: float = 0.5,
) -> None:
    """Poll `ready` until it holds; fail the test if `process` exits first or `within` seconds pass."""
    deadline = time.monotonic() + within
    while not ready():
        if process.poll() is not None:
            pytest.fail(f"{what} exited with {process.returncode}{log_tail(log)}")
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not start within {within:.0f} s{log_tail(log)}")
        time.sleep(interval)


def answers(url: str) -> bool:
    """Whether `url` answers a GET without an HTTP error."""
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except OSError:  # refused, timed out, or an HTTP error: not ready yet
        return False


def stop_process_group(process: subprocess.Popen, first: int = signal.SIGTERM, grace: float = 20) -> None:
    """The process and whatever it started in its session (a worker, a raylet): `first`, then SIGKILL for
    whatever outlives `grace` seconds."""
    for sent in (first, signal.SIGKILL):
        try:
            os.killpg(process.pid, sent)
        except ProcessLookupError:
            break  # nothing of the group is left
        try:
            process.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue
    process.wait(timeout=30)


@contextmanager
def http_server(
    command: list[str],
    ready_url: str,
    what: str,
    within: float,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    log: Path | None = None,
    interval: float = 0.5,
) -> Iterator[subprocess.Popen]:
    """`command` in a session of its own, once `ready_url` answers; stopped, with all it started, on leaving.
    Its output goes to `log` where one is given (and ends a failure's message), else nowhere."""
    with log.open("w") if log is not None else open(os.devnull, "w") as output:
        process = subprocess.Popen(
            command, cwd=cwd, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        wait_until(lambda: answers(ready_url), process, what, within, log, interval)
        yield process
    finally:
        stop_process_group(process)
