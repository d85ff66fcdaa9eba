"""Predict on a folder of images: prepare (check and load), then execute (decode, predict, write, explain).

`prepare_prediction` does everything that can fail on bad input (no images, a model
that is not there or not a model, a device that is not there, a model --explain does
not cover) before anything is written; `execute_prediction` then streams the images
through the model a batch at a time, while threads decode the next batches, and writes
the CSV (search/inference/output.py says what it holds) and, with --explain, an overlay
per image.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from search.cli import bars_wanted, parse_window
from search.errors import UsageError
from search.inference.images import ImageSet, decode_workers, decoded_batches, find_images
from search.inference.model_source import fetched_model_file
from search.inference.output import (
    FLAG_COLUMN,
    PredictionWriter,
    partial_file,
    saliency_folder,
    skipped_file,
    skipped_lines,
)
from search.tracking.registered import RegisteredModel

if TYPE_CHECKING:
    from search.inference.predictor import LoadedModel

SHOWN_FAILURES = 3
"""Skipped files named in the warning; the skipped list has them all."""
PROGRESS_LINES = 10
"""Without a terminal: a progress line at every tenth of the images."""


@dataclass(frozen=True, kw_only=True)
class PreparedPrediction:
    model: LoadedModel
    images: ImageSet
    out: Path
    saliency: Path | None
    """The overlays' folder with --explain, else None."""
    batch_size: int
    shown_as: str
    """The model as --model named it."""
    window: tuple[float, float] | None = None
    """The (center, width) DICOM images are windowed with: --window, else the model file's (its study's); None:
    each file's own."""


def prepare_prediction(args: argparse.Namespace, source: RegisteredModel | Path) -> PreparedPrediction:
    out = Path(args.out)
    # An earlier run's overlays are images too: never predict on them.
    images = find_images(Path(args.images), skip=saliency_folder(out))
    if not images.paths:
        raise UsageError(no_images(args.images, images))
    with fetched_model_file(source, args.tracking_uri) as path:
        # Deferred: torch and timm load once the images and the model's source are known to be there.
        from search.inference.predictor import load_model, select_device

        model = load_model(path, select_device(args.device), args.model)
    if args.explain:
        from search.inference.saliency import explain_problem

        problem = explain_problem(model.spec.name)
        if problem:
            raise UsageError(problem)
    return PreparedPrediction(
        model=model,
        images=images,
        out=out,
        saliency=saliency_folder(out) if args.explain else None,
        batch_size=args.batch_size,
        shown_as=args.model,
        window=model.window if args.window is None else parse_window(args.window),  # as the model was trained
    )


def no_images(source: str, images: ImageSet) -> str:
    from trainables.data import IMAGE_SUFFIXES

    found = f" (only {images.ignored} file(s) of other kinds)" if images.ignored else ""
    return f"--images {source}: no images there{found}; give a folder or file of {', '.join(sorted(IMAGE_SUFFIXES))}"


# ---------------------------------------------------------------- execute


def execute_prediction(prepared: PreparedPrediction) -> int:
    import torch  # loaded with the model already

    model, images, out = prepared.model, prepared.images, prepared.out
    print(f"Model:    {prepared.shown_as} ({model_summary(model)})")
    ignored = f" ({images.ignored} file(s) that are not images ignored)" if images.ignored else ""
    print(f"Images:   {len(images.paths)} in {images.root}{ignored}")
    if prepared.window is not None:
        center, width = prepared.window
        print(f"Window:   DICOM images at center {center:g}, width {width:g}")
    if model.flag is not None:
        print(f"Flag:     {model.flag.describe()}: the CSV's {FLAG_COLUMN} column")
    if prepared.saliency is not None:
        saliency_note(model)
    partial = partial_file(out)
    start = time.perf_counter()
    try:
        rows, failures, flagged = predict_all(prepared, partial)
    except KeyboardInterrupt:
        discard(partial)
        print(f"\nstopped: {out} was not written")
        return 130
    except torch.cuda.OutOfMemoryError:
        discard(partial)
        raise UsageError(f"the GPU ran out of memory at --batch-size {prepared.batch_size}: give fewer") from None
    except BaseException:
        discard(partial)  # a half-written CSV is no result
        raise
    seconds = time.perf_counter() - start
    list_skipped(out, failures)
    if rows == 0:
        discard(partial)
        raise UsageError(f"none of the {len(images.paths)} images could be read: {skipped_file(out)} says why")
    try:
        partial.replace(out)
    except OSError as error:  # predict.py checked the folder: something changed it while the images ran
        discard(partial)
        raise UsageError(f"cannot write {out} ({error.strerror}): its {rows} predictions were not kept") from None
    print(f"Wrote {out}: {rows} images in {seconds:.1f} s ({rows / seconds:.1f} images/s)")
    if model.flag is not None:
        print(f"Flagged:  {flagged} of {rows} images as {model.flag.positive} ({model.flag.rule()})")
    if prepared.saliency is not None:
        print(f"Saliency: {prepared.saliency}/ ({rows} overlays)")
    if failures:
        warn_skipped(out, failures, len(images.paths))
    return 0


def discard(partial: Path) -> None:
    """Remove a CSV that will not be whole, if it is there: never a second error on top of the one that
    stopped the run (a partial never created in a folder that cannot be written, or a read-only mount)."""
    with suppress(OSError):
        partial.unlink(missing_ok=True)


def predict_all(prepared: PreparedPrediction, partial: Path) -> tuple[int, list[tuple[str, str]], int]:
    """Every image through the model into the CSV at `partial`: (rows written, (path, error) of the skipped,
    rows flagged by the model's operating point)."""
    model, images = prepared.model, prepared.images
    failures: list[tuple[str, str]] = []
    with partial.open("w", newline="") as stream, progress(len(images.paths)) as advance:
        writer = PredictionWriter(stream, model.classes, model.flag)
        batches = decoded_batches(images, model.spec.img_size, prepared.batch_size, decode_workers(), prepared.window)
        for batch in batches:
            failures += batch.failures
            if batch.paths:
                predict_batch(prepared, writer, batch.paths, batch.images)
            advance(len(batch.paths) + len(batch.failures))
    return writer.rows, failures, writer.flagged


def predict_batch(prepared: PreparedPrediction, writer: PredictionWriter, paths: list[str], images: np.ndarray) -> None:
    from search.inference.predictor import calibrated, calibrated_probabilities

    model = prepared.model
    if prepared.saliency is None:
        writer.write(paths, calibrated_probabilities(model, images))
        return
    from search.inference.saliency import explain

    if model.single:
        logits, maps = explain(model, images)  # the CAM's forward pass predicts too: one pass, not two
        probabilities = calibrated(logits, model.temperature)
    else:  # the ensemble's (or flips') probabilities; the first member's map of the class they predict
        probabilities = calibrated_probabilities(model, images)
        maps = explain(model, images, probabilities.argmax(axis=1))[1]
    writer.write(paths, probabilities)
    write_overlays(prepared.saliency, model.classes, paths, images, maps, probabilities)


def write_overlays(
    folder: Path, classes: list[str], paths: list[str], images: np.ndarray, maps: np.ndarray, probabilities: np.ndarray
) -> None:
    """One overlay per image, of the class the CSV predicts for it."""
    from search.inference.saliency import overlay, overlay_path

    def draw(i: int) -> None:
        best = int(probabilities[i].argmax())
        target = overlay_path(folder, paths[i])
        target.parent.mkdir(parents=True, exist_ok=True)
        overlay(images[i], maps[i], f"{classes[best]}  p={probabilities[i, best]:.3f}").save(target, compress_level=1)

    # PNG compression took most of an overlay's time, and zlib releases the GIL: draw them in threads.
    with ThreadPoolExecutor(max_workers=decode_workers()) as pool:
        list(pool.map(draw, range(len(paths))))


def model_summary(model: LoadedModel) -> str:
    """'cnn, 4 classes, 224 px, temperature 1.27, on cuda'; for an ensemble or flips, 'vit, 4 classes, 32 px, on
    cpu; ensemble of 3 (t07, t03, t12), flips hflip: 6 forward passes per image' (each member has its own
    temperature)."""
    spec = model.spec
    name = f"{spec.name} {spec.backbone}" if spec.backbone else spec.name
    temperature = f"temperature {model.temperature:.3g}, " if len(model.scoring.networks) == 1 else ""
    described = f"{name}, {len(model.classes)} classes, {spec.img_size} px, {temperature}on {model.device.type}"
    return f"{described}; {model.summary}" if model.summary else described


def saliency_note(model: LoadedModel) -> None:
    from search.inference.saliency import cam_layer

    if len(model.scoring.networks) > 1:
        print(
            f"Explain:  Grad-CAM of the first member ({model.first_member}) alone, for the class the ensemble predicts"
        )
    elif model.scoring.flips:
        print("Explain:  Grad-CAM of the image unflipped, for the class the average over its flips predicts")
    grid = cam_layer(model).grid
    if grid == (1, 1):
        print(
            f"note: at {model.spec.img_size} px the {model.spec.name}'s last convolution is 1x1: its heat maps "
            f"cannot point anywhere (a model trained on larger images can)"
        )


def list_skipped(out: Path, failures: list[tuple[str, str]]) -> None:
    """Every file that did not decode, with why, beside the CSV; an earlier run's list removed when none."""
    listing = skipped_file(out)
    if failures:
        listing.write_text(skipped_lines(failures))
    else:
        listing.unlink(missing_ok=True)  # it would name files that decode now


def warn_skipped(out: Path, failures: list[tuple[str, str]], total: int) -> None:
    named = ", ".join(path for path, _ in failures[:SHOWN_FAILURES])
    more = ", ..." if len(failures) > SHOWN_FAILURES else ""
    print(
        f"warning: {len(failures)} of {total} images could not be read and were skipped ({named}{more}): "
        f"see {skipped_file(out)}",
        file=sys.stderr,
    )


# ---------------------------------------------------------------- progress


@contextmanager
def progress(total: int) -> Iterator[Callable[[int], None]]:
    """advance(n) after each batch: a tqdm bar on a terminal, else a line at every tenth of the images."""
    if bars_wanted():
        from tqdm import tqdm

        with tqdm(total=total, unit="img", desc="predict", dynamic_ncols=True) as bar:
            yield bar.update
        return
    done, shown, start = 0, 0, time.perf_counter()

    def advance(count: int) -> None:
        nonlocal done, shown
        done += count
        tenth = done * PROGRESS_LINES // total
        if tenth > shown and done < total:
            shown = tenth
            rate = done / max(time.perf_counter() - start, 1e-9)
            print(f"predicted {done}/{total} images ({rate:.1f} images/s)", flush=True)

    yield advance
