"""Start-up: from launching search/run.py to its first trial's first epoch, with and without a running cluster.

    python bench/startup.py [--repeats 3]

A one-trial, one-epoch vit study (`--smoke --data synthetic --no-pretrained`, 32 px, on the
CPU) is launched `--repeats` times each way, alternating:
  private    run.py starts its own Ray (the default)
  cluster    run.py --address joins a head started once before (`ray start --head`, token auth)
and the times at which its lines appear are read off its output:
  started    launch -> "t00 started" (imports, caching, Ray joined or started, Tune set up)
  epoch 1    launch -> "t00 epoch  1/1" (plus the trial's process: start, imports, one epoch)
Medians are printed side by side. Benchmarks are not tests: nothing here asserts.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from common import ROOT, Row, fmt, machine_info, markdown_table, text_table, verdict

STUDY = ("--model", "vit", "--trials", "1", "--epochs", "1", "--smoke", "--data", "synthetic:3", "--no-pretrained")
MARKS = {"started": "t00 started", "epoch 1": "t00 epoch  1/1"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_head(env: dict, folder: Path) -> tuple[subprocess.Popen, str]:
    """A head node on loopback, as `ray start --head` starts one; returns once it runs."""
    port = free_port()
    log = folder / "head.log"
    with log.open("w") as output:
        head = subprocess.Popen(
            [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block", "--port", str(port),
             "--include-dashboard", "false", "--disable-usage-stats", "--node-ip-address", "127.0.0.1",
             "--temp-dir", tempfile.mkdtemp(prefix="ray-", dir="/tmp")],
            stdout=output, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip
    while "block forever" not in log.read_text():
        if head.poll() is not None:
            raise RuntimeError(log.read_text()[-2000:])
        time.sleep(0.5)
    return head, f"127.0.0.1:{port}"


def timed_study(folder: Path, env: dict, *extra: str) -> dict[str, float]:
    """Seconds from launch to each mark's line, for one study in a fresh folder."""
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(ROOT / "spaces", folder / "spaces")
    launched = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "search" / "run.py"), *STUDY, "--name", "startup", *extra],
        cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**env, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    assert process.stdout is not None
    seen: dict[str, float] = {}
    for line in process.stdout:
        for mark, text in MARKS.items():
            if mark not in seen and line.startswith(text):
                seen[mark] = time.monotonic() - launched
    process.wait()
    if process.returncode != 0 or len(seen) < len(MARKS):
        raise RuntimeError(f"the study failed (exit code {process.returncode})")
    return seen


def measure(repeats: int) -> dict[str, dict[str, list[float]]]:
    folder = Path(tempfile.mkdtemp(prefix="startup-"))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=uuid.uuid4().hex)
    head, address = start_head(env, folder)
    times: dict[str, dict[str, list[float]]] = {way: {mark: [] for mark in MARKS} for way in ("private", "cluster")}
    try:
        for _ in range(repeats):
            for way, extra in (("private", ()), ("cluster", ("--address", address))):
                for mark, seconds in timed_study(folder / way, env, *extra).items():
                    times[way][mark].append(seconds)
                print(f"{way:<8} " + "  ".join(f"{m} {s[-1]:.1f} s" for m, s in times[way].items()), flush=True)
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=60)
        shutil.rmtree(folder, ignore_errors=True)
    return times


def rows(times: dict[str, dict[str, list[float]]]) -> list[Row]:
    table = []
    for mark in MARKS:
        cluster, private = (statistics.median(times[way][mark]) for way in ("cluster", "private"))
        table.append(
            Row(
                "start-up",
                f"launch -> {MARKS[mark]!r}, s (median)",
                f"{fmt(cluster)} (--address, running cluster)",
                f"{fmt(private)} (private Ray)",
                f"{private / cluster:.2f}x",
                "≤ 10 s" if mark == "epoch 1" else "",
                verdict(cluster <= 10) if mark == "epoch 1" else "",
            )
        )
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="studies launched each way")
    args = parser.parse_args()
    print(" ".join(f"{k}: {v}" for k, v in machine_info("cpu").items()))
    table = rows(measure(args.repeats))
    print(text_table(table))
    print(markdown_table(table))


if __name__ == "__main__":
    main()
