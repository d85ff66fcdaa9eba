"""Shared test helpers: small generated image folders, a small tmpfs, a way to run the scripts, a study config."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


def write_image_folder(root: Path, per_class: dict[str, int], size: int = 40, suffix: str = ".png") -> Path:
    """root/<class>/<n>.png with a class-dependent colour, so a model can tell them apart."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for label, (name, count) in enumerate(per_class.items()):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            pixels = rng.integers(0, 60, (size, size, 3)) + np.array([80 * label % 255, 40, 200 - 60 * label % 200])
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"{i:03d}{suffix}")
    return root


@contextmanager
def mounted_tmpfs(
    where: Path, megabytes: int = 64, copy_from: Path | None = None, read_only: bool = False
) -> Iterator[Path]:
    """A small tmpfs at `where` (a full or read-only disk on demand); skips the test where mounting is not allowed."""
    where.mkdir(parents=True, exist_ok=True)
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(where)], capture_output=True
    )
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mount.stderr.decode().strip()}")
    try:
        if copy_from is not None:
            shutil.copytree(copy_from, where, dirs_exist_ok=True)
        if read_only:
            subprocess.run(["mount", "-o", "remount,ro", str(where)], check=True)
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def run_script(
    script: str, *args: str, cwd: Path, timeout: float = 900, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run search/<script> as a user would, in its own process."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, str(ROOT / "search" / script), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def interrupted_study(*args: str, marker: str, cwd: Path, env: dict) -> tuple[int, str]:
    """search/run.py with `args`, sent Ctrl-C once a line of its output holds `marker`: (exit code, output)."""
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "search" / "run.py"), *args],
        cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**env, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    assert process.stdout is not None
    seen = []
    for line in iter(process.stdout.readline, ""):
        seen.append(line)
        if marker in line:
            break
    process.send_signal(signal.SIGINT)
    rest = process.communicate(timeout=300)[0]
    return process.returncode, "".join(seen) + rest


def study_config(**changes):
    """A valid StudyConfig for tests (a cnn, synthetic data, CPU), with `changes` applied."""
    from search.records.study_config import StudyConfig

    values = dict(
        name="test",
        model="cnn",
        trials=3,
        data="synthetic",
        space=str(ROOT / "spaces" / "cnn.yaml"),
        epochs=3,
        img_size=32,
        gpus_per_trial=0.0,
        max_concurrent=1,
        storage_path="/tmp/ray_results",
        cache_dir="/tmp/cache",
        tracking_uri="sqlite:////tmp/mlflow.db",
        experiment="cnn",
    )
    return StudyConfig(**{**values, **changes})


def structured_image(number: int, size: int = 48) -> np.ndarray:
    """A distinct image with real structure (blurred blobs, full contrast), deterministic per number: unlike flat
    colours or pixel noise, it is what a perceptual hash is made for."""
    from PIL import Image, ImageFilter

    noise = np.random.default_rng([7, number]).integers(0, 256, (size, size, 3), dtype=np.uint8)
    blurred = np.asarray(Image.fromarray(noise).filter(ImageFilter.GaussianBlur(size / 12)), dtype=np.float64)
    stretched = (blurred - blurred.mean()) * (110 / max(blurred.std(), 1e-6)) + 128
    return stretched.clip(0, 255).astype(np.uint8)


def write_manifest(path: Path, header: str, rows: list[str]) -> Path:
    """A CSV manifest: its header line, then one line per row."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def write_patient_images(root: Path, patients: dict[str, tuple[str, int]], size: int = 48) -> list[str]:
    """root/<patient>_<n>.png, count images per patient of its class, each distinct: the manifest rows
    'path,label,group' that list them."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    rows, number = [], 0
    for patient, (label, count) in patients.items():
        for i in range(count):
            name = f"{patient}_{i}.png"
            Image.fromarray(structured_image(number, size)).save(root / name)
            rows.append(f"{root.name}/{name},{label},{patient}")
            number += 1
    return rows
