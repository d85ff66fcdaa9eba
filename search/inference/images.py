"""The images to predict on: found under a folder (or one file), decoded by threads a batch ahead.

Decoding is trainables.data.decode_image, the function that filled the training cache,
so the model sees a new image exactly as it saw its training images (RGB, 16-bit
greyscale scaled, DICOM windowed as in training, resized to the model's size). A file that does not decode is
reported with its error instead of stopping the run.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trainables.data import IMAGE_SUFFIXES, decode_image, failure_reason

BATCHES_AHEAD = 2
"""Batches decoded while the device works on the current one: enough to keep it busy, few enough to
hold a folder of any size in bounded memory."""


@dataclass(frozen=True)
class ImageSet:
    root: Path
    """Where the relative paths start: the --images folder, or a single file's folder."""
    paths: list[str]
    """Image files relative to root, '/'-separated and sorted."""
    ignored: int
    """Files left out because their suffix is not an image's."""


def find_images(source: Path, skip: Path | None = None) -> ImageSet:
    """Image files under `source` (recursively; hidden files and folders left out), or `source` itself.

    `skip` is a folder never read: the saliency overlays of an earlier run, should they lie inside `source`.
    """
    if source.is_file():
        wanted = source.suffix.lower() in IMAGE_SUFFIXES
        return ImageSet(source.parent, [source.name] if wanted else [], 0 if wanted else 1)
    skipped = skip.resolve() if skip is not None else None
    paths, ignored = [], 0
    for folder, subfolders, files in os.walk(source):
        subfolders[:] = [
            name for name in subfolders if not name.startswith(".") and (Path(folder, name).resolve() != skipped)
        ]
        for name in files:
            if name.startswith("."):
                continue  # macOS's ._name.jpg and the like are not images, whatever their suffix
            if Path(name).suffix.lower() in IMAGE_SUFFIXES:
                paths.append(Path(folder, name).relative_to(source).as_posix())
            else:
                ignored += 1
    return ImageSet(source, sorted(paths), ignored)


@dataclass(frozen=True)
class DecodedBatch:
    paths: list[str]
    """The images that decoded, in order."""
    images: np.ndarray
    """(len(paths), size, size, 3) uint8."""
    failures: list[tuple[str, str]]
    """(path, error) of the ones that did not."""


def decoded_batches(
    images: ImageSet, size: int, batch_size: int, workers: int, window: tuple[float, float] | None = None
) -> Iterator[DecodedBatch]:
    """The images in batches, in order; threads decode the next batches meanwhile (PIL releases the GIL). `window`:
    the (center, width) DICOM images are windowed with, as the model's training images were; None: each file's."""

    def decode(relative: str) -> np.ndarray | str:
        try:
            return decode_image(images.root / relative, size, window)
        except Exception as error:  # PIL raises many types for a broken or foreign file
            return failure_reason(error)

    chunks = [images.paths[i : i + batch_size] for i in range(0, len(images.paths), batch_size)]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque[tuple[list[str], list[Future]]] = deque()
        for chunk in chunks:
            pending.append((chunk, [pool.submit(decode, path) for path in chunk]))
            if len(pending) > BATCHES_AHEAD:
                yield collected(*pending.popleft(), size)
        while pending:
            yield collected(*pending.popleft(), size)


def collected(paths: list[str], futures: list[Future], size: int) -> DecodedBatch:
    results = [future.result() for future in futures]
    decoded = [(path, r) for path, r in zip(paths, results, strict=True) if isinstance(r, np.ndarray)]
    failures = [(path, r) for path, r in zip(paths, results, strict=True) if isinstance(r, str)]
    array = np.stack([r for _, r in decoded]) if decoded else np.empty((0, size, size, 3), np.uint8)
    return DecodedBatch([path for path, _ in decoded], array, failures)


def decode_workers() -> int:
    """Threads for decoding: the cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
