"""Shared helpers for the benchmarks: machine description, test images, timing, the table.

Benchmarks are not tests: they measure, print and never assert. Each benchmark module
has a `run(device, quick, ...) -> dict` returning plain numbers; run_all.py turns those
into one table.
"""

from __future__ import annotations

import contextlib
import os
import platform
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
NUM_WORKERS = 2
"""DataLoader workers for the torchvision baseline, and torch threads for the project's path."""


# ---------------------------------------------------------------- the machine


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str) -> dict[str, str]:
    import torch

    info = {
        "cpu": cpu_model(),
        "cores": str(os.cpu_count()),
        "torch threads": str(torch.get_num_threads()),
        "gpu": "none",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": device,
        "date": datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = f"{props.name}, {props.total_memory / 2**30:.1f} GiB, CUDA {torch.version.cuda}"
    with contextlib.suppress(OSError):  # no load average on this platform
        info["load average"] = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return info


def resolve_device(name: str | None):
    import torch

    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA GPU is visible: pass --device cpu")
    return torch.device(name)


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------- test images


def structured_image(rng: np.random.Generator, label: int, num_classes: int, size: int) -> np.ndarray:
    """An RGB uint8 image with a class hue, a smooth gradient, a few shapes and sensor noise.

    Structure (edges, smooth areas, texture) makes JPEG sizes and decode times look like
    photographs rather than like flat colour or white noise. Drawn small and with PIL so
    that hundreds of images take seconds, not minutes.
    """
    from PIL import Image, ImageDraw

    low = 16
    yy, xx = np.mgrid[0 : 1 : low * 1j, 0 : 1 : low * 1j]
    base = 0.5 + 0.35 * np.cos(2 * np.pi * (label / num_classes + np.array([0.0, 1 / 3, 2 / 3])))
    angle = rng.uniform(0, np.pi)
    field = base * (0.6 + 0.3 * (np.cos(angle) * xx + np.sin(angle) * yy))[..., None] + rng.normal(
        0, 0.05, (low, low, 3)
    )
    image = Image.fromarray((np.clip(field, 0, 1) * 255).astype(np.uint8)).resize(
        (size, size), Image.Resampling.BICUBIC
    )
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(4, 9))):  # blobs and bars of other colours
        x, y = rng.uniform(0, size, 2)
        r = rng.uniform(0.04, 0.2) * size
        colour = tuple(int(c) for c in rng.integers(20, 235, 3))
        if rng.uniform() < 0.5:
            draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)
        else:
            draw.rectangle((x - r, y - r / 3, x + r, y + r / 3), fill=colour)
    pixels = np.asarray(image, dtype=np.int16)
    noise = _noise_tile(size)
    shift = rng.integers(0, size, 2)
    pixels = pixels + np.roll(noise, tuple(int(s) for s in shift), axis=(0, 1))
    return np.clip(pixels, 0, 255).astype(np.uint8)


_NOISE: dict[int, np.ndarray] = {}


def _noise_tile(size: int) -> np.ndarray:
    """Sensor-like noise (std 8 grey levels), drawn once per size and shifted per image."""
    if size not in _NOISE:
        _NOISE[size] = np.random.default_rng(12345).normal(0, 8, (size, size, 3)).astype(np.int16)
    return _NOISE[size]


def write_jpeg_folder(root: Path, count: int, size: int = 512, num_classes: int = 4, seed: int = 0) -> Path:
    """root/<class>/<n>.jpg: `count` JPEGs (quality 90) of size x size, spread over classes."""
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    root = Path(root)

    def write(i: int) -> None:
        label = i % num_classes
        image = structured_image(np.random.default_rng([seed, i]), label, num_classes, size)
        Image.fromarray(image).save(root / f"class_{label}" / f"{i:05d}.jpg", quality=90)

    for label in range(num_classes):
        (root / f"class_{label}").mkdir(parents=True, exist_ok=True)
    _noise_tile(size)
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        list(pool.map(write, range(count)))
    return root


def write_array_split(path: Path, count: int, size: int, num_classes: int, seed: int = 0):
    """A CachedSplit written directly (no JPEGs): for benchmarks that start after the cache.

    Labels cycle through the classes, so image i has label i % num_classes.
    """
    from trainables.data import CachedSplit

    images = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(count, size, size, 3))
    unique = min(count, 256)  # then repeated: pixels do not change a training step's cost
    for i in range(unique):
        images[i] = structured_image(np.random.default_rng([seed, i]), i % num_classes, num_classes, size)
    for i in range(unique, count):
        images[i] = images[i % unique]
    images.flush()
    del images
    return CachedSplit(str(path), np.arange(count, dtype=np.int64) % num_classes)


# ---------------------------------------------------------------- timing


class Stopwatch:
    """Accumulates the seconds spent in named sections."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def wrap(self, name: str, function):
        def timed(*args, **kwargs):
            with self(name):
                return function(*args, **kwargs)

        return timed


# ---------------------------------------------------------------- the table


@dataclass
class Row:
    benchmark: str
    measure: str
    project: str
    baseline: str = ""
    ratio: str = ""
    goal: str = ""
    met: str = ""
    notes: str = ""

    def cells(self) -> tuple[str, ...]:
        return (self.benchmark, self.measure, self.project, self.baseline, self.ratio, self.goal, self.met, self.notes)


COLUMNS = ("benchmark", "measure", "this project", "baseline", "ratio", "goal", "met", "notes")


def fmt(value: float | None, digits: int = 3) -> str:
    """A number with `digits` significant figures, or an em dash for missing values."""
    if value is None or (isinstance(value, float) and value != value):
        return "—"
    if isinstance(value, int) or (abs(value) >= 10**digits):
        return f"{value:,.0f}"
    return f"{value:.{digits}g}" if abs(value) >= 1 else f"{value:.{digits}f}".rstrip("0").rstrip(".") or "0"


def verdict(ok: bool | None) -> str:
    return "" if ok is None else ("yes" if ok else "NO")


def text_table(rows: list[Row]) -> str:
    cells = [COLUMNS] + [r.cells() for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    lines = []
    for n, row in enumerate(cells):
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
        if n == 0:
            lines.append("  ".join("-" * width for width in widths))
    return "\n".join(lines)


def markdown_table(rows: list[Row]) -> str:
    def escape(cell: str) -> str:
        return cell.replace("|", "\\|")

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        lines.append("| " + " | ".join(escape(c) for c in r.cells()) + " |")
    return "\n".join(lines)
