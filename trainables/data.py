"""Datasets: index a source, split it, decode it once into a shared cache.

A source is a folder with one sub-folder per class (split by PatientID where it holds
DICOM files), a folder holding train/, val/ and test/ (used as given), a CSV manifest
(trainables.manifest: split by patient), or the built-in synthetic set. DICOM files are
decoded by trainables.dicom, windowed as a radiologist sees them. The index lists samples
by key (a file path relative to the source's root folder, or a synthetic id) and splits
them. Each split is decoded once per image size into a uint8 array (N, H, W, 3) on disk that
trials memory-map read-only: no trial ever decodes an image. A cache holds only the
files of the splits that asked for it, so no trial can open a test image (the study's
leakage check decodes the test split in memory, to hash it: trainables.leakage).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image

from trainables.config import is_synthetic

SPLITS = ("train", "val", "test")
SPLIT_FRACTIONS = (0.70, 0.15, 0.15)
MANIFEST_SUFFIX = ".csv"
DICOM_SUFFIXES = {".dcm", ".dicom"}
"""Decoded by trainables.dicom (windowed as a radiologist sees them), every other image by PIL."""
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm", *DICOM_SUFFIXES}
SYNTHETIC_CLASSES = 11
SYNTHETIC_PER_CLASS = 60
SYNTHETIC_MAX_CLASSES = 1000


SPLIT_RULES = ("stratified", "folders", "manifest_column", "patients", "whole")
"""How an index split its source: stratified by class and seeded (class folders, synthetic, a manifest without
groups), as the train/, val/ and test/ folders give it, as a manifest's split column gives it, by patient
(a manifest's group column or a DICOM folder's PatientID, stratified and seeded), or not at all: every image in
one split (one_split)."""
EXTERNAL = "external"
"""The one split of an external test set (final.py --external): another site's source, tested whole."""


class DataError(ValueError):
    """A data source that cannot be used as it is; the message says how to fix it."""


@dataclass(frozen=True)
class Sample:
    key: str
    """A path relative to the source root, or a synthetic id such as 'c03-0017'."""
    label: int
    group: str | None = None
    """The patient (or study) the image belongs to: a manifest's group column, or a DICOM file's PatientID in a
    folder source; None elsewhere. Held in memory only: stores get salted hashes of it, never the id."""
    attributes: tuple[tuple[str, str], ...] = ()
    """(column, value) of each subgroup column a manifest declares (run.py --subgroups site,sex), in the declared
    order; () elsewhere. Results are reported per value (search.evaluation.subgroups); nothing trains on them."""

    def attribute(self, column: str) -> str:
        """The image's value in a declared subgroup column; a KeyError for a column not declared."""
        for name, value in self.attributes:
            if name == column:
                return value
        declared = ", ".join(name for name, _ in self.attributes) or "none"
        raise KeyError(f"{column!r} is not a subgroup column of this source (declared: {declared})")


@dataclass
class DatasetIndex:
    source: str
    """'synthetic', the absolute path of the source folder, or that of a CSV manifest."""
    classes: list[str]
    splits: dict[str, list[Sample]]
    ignored_files: int = 0
    """Files that are not images by their suffix (ignored, counted)."""
    split_by: str = "stratified"
    """How the splits were made: one of SPLIT_RULES, recorded by the indexer that made them."""
    window: tuple[float, float] | None = None
    """(center, width) every DICOM image is windowed with instead of its file's own (run.py --window): a property
    of the decoded data, part of its cache key. None: each file's VOI LUT or window, else its min..max."""
    unidentified: int = 0
    """Images of a DICOM folder source without a PatientID: each was split as a patient of its own."""

    @property
    def is_synthetic(self) -> bool:
        return is_synthetic(self.source)

    @property
    def is_manifest(self) -> bool:
        return is_manifest(self.source)

    @property
    def root(self) -> Path:
        """The folder that sample keys are relative to: a manifest's own folder, or the source folder."""
        return Path(self.source).parent if self.is_manifest else Path(self.source)

    @property
    def has_dicom(self) -> bool:
        """Whether any of its images is a DICOM file (which a window applies to)."""
        return any(is_dicom(s.key) for samples in self.splits.values() for s in samples)

    @property
    def has_groups(self) -> bool:
        return any(s.group is not None for samples in self.splits.values() for s in samples)

    def groups(self, split: str) -> list[str]:
        """The split's patients (sorted), from a manifest's group column."""
        return sorted({s.group for s in self.splits[split] if s.group is not None})

    def summary(self) -> dict:
        """Counts for people (the study's params and data.json): no patient ids, which may be sensitive."""
        summary = {
            "source": self.source,
            "num_classes": len(self.classes),
            "classes": self.classes,
            **{f"{split}_images": len(samples) for split, samples in self.splits.items()},
        }
        if self.has_groups:
            summary.update({f"{split}_groups": len(self.groups(split)) for split in self.splits})
        if self.is_manifest:
            summary["manifest_digest"] = manifest_digest(self.source)
        return summary

    def labels(self, split: str) -> np.ndarray:
        return np.array([s.label for s in self.splits[split]], dtype=np.int64)


# ---------------------------------------------------------------- indexing


def index_source(
    source: str | os.PathLike,
    seed: int,
    *,
    subgroups: tuple[str, ...] = (),
    window: tuple[float, float] | None = None,
) -> DatasetIndex:
    """Index a data source and split it (stratified and seeded unless pre-split). `subgroups`: a manifest's extra
    columns to read into each sample's attributes (run.py --subgroups); only a manifest has columns. `window`:
    the (center, width) its DICOM images are decoded with (run.py --window); kept only where it holds some."""
    source = str(source)
    if subgroups and not is_manifest(source):
        raise DataError(
            f"subgroup column(s) {', '.join(subgroups)} (run.py --subgroups) are columns of a CSV manifest, and "
            f"{source} is not one: give a manifest with those columns as --data, or run the study without --subgroups"
        )
    if is_synthetic(source):
        return with_window(synthetic_index(source, seed), window)
    root = Path(source).expanduser().resolve()
    if is_manifest(str(root)):
        from trainables.manifest import manifest_index  # deferred: the manifest module builds on this one's records

        return with_window(manifest_index(root, seed, subgroups), window)
    if root.is_file():
        raise DataError(
            f"--data {root} is a file: pass the folder that holds the class sub-folders, a CSV manifest "
            f"(*{MANIFEST_SUFFIX}: path,label[,group][,split]), or --data synthetic"
        )
    if not root.is_dir():
        raise DataError(
            f"data folder {root} does not exist: put images there (one sub-folder per class), "
            f"or pass --data PATH (a folder, or a CSV manifest), or try --data synthetic"
        )
    present = [split for split in SPLITS if (root / split).is_dir()]
    if len(present) == len(SPLITS):
        return with_window(presplit_index(root), window)
    if len(present) >= 2:  # a pre-split layout with a split missing, not classes named 'train' and 'val'
        missing = ", ".join(f"{split}/" for split in SPLITS if split not in present)
        raise DataError(
            f"data folder {root} holds {' and '.join(f'{s}/' for s in present)} but no {missing}: add {missing} "
            f"with the same class folders, or point --data at a folder of class folders to have it split"
        )
    return with_window(class_folder_index(root, seed), window)


def class_folder_index(root: Path, seed: int) -> DatasetIndex:
    """Class folders split 70/15/15, stratified and seeded; by patient where they hold DICOM files (patient_split)."""
    classes, samples, ignored = scan_class_folders(root)
    if any(is_dicom(sample.key) for sample in samples):
        return patient_split(root, classes, samples, ignored, seed)
    labels = np.array([s.label for s in samples])
    parts = stratified_split(labels, seed, classes)
    return DatasetIndex(str(root), classes, {split: [samples[i] for i in parts[split]] for split in SPLITS}, ignored)


def patient_split(root: Path, classes: list[str], samples: list[Sample], ignored: int, seed: int) -> DatasetIndex:
    """Class folders of DICOM files split by their PatientID, grouped and stratified as a manifest's group column
    is (trainables.manifest.grouped_split), so that no patient's images are in two splits. An image without a
    PatientID (or no DICOM) is a patient of its own, and counted (DatasetIndex.unidentified)."""
    from trainables.dicom import patients_of  # deferred: pydicom loads for DICOM sources only
    from trainables.manifest import grouped_split
    from trainables.privacy import patient_salt

    patient_salt()  # read (or made) now, before anything is written: every record of a patient is hashed with it

    keys = [s.key for s in samples if is_dicom(s.key)]
    patient_of = dict(zip(keys, patients_of([root / key for key in keys]), strict=True))
    samples = [replace(sample, group=patient_of.get(sample.key)) for sample in samples]
    # A file's own group is named after the file: no PatientID reads "file <path>".
    groups = [s.group if s.group is not None else f"file {s.key}" for s in samples]
    parts = grouped_split(np.array([s.label for s in samples]), groups, seed, classes)
    splits = {split: [samples[i] for i in parts[split]] for split in SPLITS}
    unidentified = sum(s.group is None for s in samples)
    return DatasetIndex(str(root), classes, splits, ignored, split_by="patients", unidentified=unidentified)


def with_window(index: DatasetIndex, window: tuple[float, float] | None) -> DatasetIndex:
    """The index with the window its DICOM images are decoded with. A source without DICOM files keeps none: it
    would change nothing but the cache's name (run.py refuses such a --window; an external test set of PNGs for
    a study of DICOM files is decoded as it would be without)."""
    return replace(index, window=window) if window is not None and index.has_dicom else index


def is_dicom(path: str | os.PathLike) -> bool:
    """A DICOM file, by its suffix."""
    return Path(path).suffix.lower() in DICOM_SUFFIXES


def one_split(index: DatasetIndex, name: str = EXTERNAL) -> DatasetIndex:
    """Every sample of an index in one split `name`, in key order (not the seeded split's order, so that the
    same files make the same split, and the same cache, whatever seed indexed them)."""
    samples = sorted((s for split in index.splits.values() for s in split), key=lambda sample: sample.key)
    return replace(index, splits={name: samples}, split_by="whole")


def scan_class_folders(root: Path, prefix: str = "") -> tuple[list[str], list[Sample], int]:
    """Classes (sorted sub-folder names) and their image files under root."""
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise DataError(
            f"data folder {root} has no class sub-folders: put each class's images in "
            f"{root}/<class name>/, or pass --data synthetic"
        )
    if len(class_dirs) < 2:
        raise DataError(f"data folder {root} holds one class ({class_dirs[0].name}): a classifier needs at least 2")
    samples, ignored = [], 0
    for label, class_dir in enumerate(class_dirs):
        files = sorted(p for p in class_dir.rglob("*") if p.is_file())
        images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
        ignored += len(files) - len(images)
        if not images:
            raise DataError(
                f"class folder {class_dir} has no images ({', '.join(sorted(IMAGE_SUFFIXES))}): add some or remove it"
            )
        samples += [Sample(prefix + str(p.relative_to(root)), label) for p in images]
    return [p.name for p in class_dirs], samples, ignored


def presplit_index(root: Path) -> DatasetIndex:
    splits, class_sets, ignored = {}, {}, 0
    for split in SPLITS:
        classes, samples, n_ignored = scan_class_folders(root / split, prefix=f"{split}/")
        splits[split], class_sets[split], ignored = samples, classes, ignored + n_ignored
    if len({tuple(c) for c in class_sets.values()}) > 1:
        detail = "; ".join(f"{s}: {', '.join(c)}" for s, c in class_sets.items())
        raise DataError(
            f"train/, val/ and test/ under {root} hold different classes ({detail}): give them the same class folders"
        )
    return DatasetIndex(str(root), class_sets["train"], splits, ignored, split_by="folders")


def stratified_split(labels: np.ndarray, seed: int, classes: list[str]) -> dict[str, np.ndarray]:
    """70/15/15 per class, seeded; every class gets at least one image in each split."""
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {split: [] for split in SPLITS}
    for label in range(len(classes)):
        members = np.flatnonzero(labels == label)
        if len(members) < len(SPLITS):
            raise DataError(
                f"class {classes[label]!r} has {len(members)} image(s): a stratified train/val/test "
                f"split needs at least {len(SPLITS)} per class; add images or drop the class"
            )
        members = rng.permutation(members)
        n_val = max(1, round(len(members) * SPLIT_FRACTIONS[1]))
        n_test = max(1, round(len(members) * SPLIT_FRACTIONS[2]))
        n_train = len(members) - n_val - n_test
        parts["train"].append(members[:n_train])
        parts["val"].append(members[n_train : n_train + n_val])
        parts["test"].append(members[n_train + n_val :])
    return {split: np.sort(np.concatenate(p)) for split, p in parts.items()}


def is_manifest(source: str) -> bool:
    """A CSV file names a manifest (path,label[,group][,split]), anything else a folder or the synthetic set."""
    return not is_synthetic(source) and source.lower().endswith(MANIFEST_SUFFIX)


def manifest_digest(path: str | os.PathLike) -> str:
    """The manifest's fingerprint (sha256 of its bytes, short): its rows decide the split."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]


def subsample(index: DatasetIndex, per_class: dict[str, int], seed: int) -> DatasetIndex:
    """At most per_class[split] samples of each class per split (for --smoke)."""
    rng = np.random.default_rng(seed)
    splits = {}
    for split, samples in index.splits.items():
        limit = per_class.get(split)
        if limit is None:
            splits[split] = samples
            continue
        kept = []
        for label in range(len(index.classes)):
            members = [s for s in samples if s.label == label]
            kept += [members[i] for i in sorted(rng.permutation(len(members))[:limit])]
        splits[split] = kept
    return replace(index, splits=splits)


# ---------------------------------------------------------------- synthetic


def synthetic_index(source: str, seed: int) -> DatasetIndex:
    """'synthetic' (11 classes) or 'synthetic:C'; 60 images per class, split as a folder would be."""
    _, _, count = source.partition(":")
    try:
        num_classes = int(count) if count else SYNTHETIC_CLASSES
    except ValueError:
        num_classes = 0
    if not 2 <= num_classes <= SYNTHETIC_MAX_CLASSES:
        raise DataError(
            f"--data {source}: write 'synthetic' or 'synthetic:C' with 2 <= C <= {SYNTHETIC_MAX_CLASSES} classes"
        )
    classes = [f"class_{c:02d}" for c in range(num_classes)]
    samples = [Sample(f"c{c:02d}-{i:04d}", c) for c in range(num_classes) for i in range(SYNTHETIC_PER_CLASS)]
    parts = stratified_split(np.array([s.label for s in samples]), seed, classes)
    return DatasetIndex(source, classes, {split: [samples[i] for i in parts[split]] for split in SPLITS})


def synthetic_image(key: str, num_classes: int, size: int) -> np.ndarray:
    """One image of a class: a class hue and an oriented stripe pattern, with per-image jitter.

    Deterministic per key, so the same id is the same image in every study.
    """
    label, number = (int(part) for part in key[1:].split("-"))
    rng = np.random.default_rng([label, number])
    hue = label / num_classes + rng.normal(0, 0.015)
    angle = np.pi * label / num_classes + rng.normal(0, 0.08)
    frequency = 2.0 + (label % 3) + rng.normal(0, 0.2)
    yy, xx = np.mgrid[-1 : 1 : size * 1j, -1 : 1 : size * 1j]
    stripes = np.sin(2 * np.pi * frequency * (xx * np.cos(angle) + yy * np.sin(angle)) + rng.uniform(0, 2 * np.pi))
    colour = 0.5 + 0.4 * np.cos(2 * np.pi * (hue + np.array([0.0, 1 / 3, 2 / 3])))
    image = colour * (0.65 + 0.3 * stripes[..., None]) + rng.normal(0, 0.04, (size, size, 3))
    return (np.clip(image, 0, 1) * 255).astype(np.uint8)


# ---------------------------------------------------------------- decoding


def decode_image(path: Path, size: int, window: tuple[float, float] | None = None) -> np.ndarray:
    """Decode any PIL-readable image, or a DICOM file (by its suffix; windowed with `window` where given, else as
    its file says: trainables.dicom), to RGB uint8, resized to size x size."""
    if is_dicom(path):
        from trainables.dicom import decode_dicom  # deferred: pydicom loads with the first DICOM file

        return decode_dicom(path, size, window)
    with Image.open(path) as image:
        image.draft("RGB", (size, size))  # JPEG: decode at reduced scale when the file is large
        if image.mode in ("I;16", "I;16B", "I;16L", "I"):
            # 16-bit and 32-bit integer greyscale: scale to 8 bits rather than clip.
            array = np.asarray(image, dtype=np.float64)
            image = Image.fromarray((array * (255.0 / max(array.max(), 1.0))).astype(np.uint8))
        return resized(image, size)


def resized(image: Image.Image | np.ndarray, size: int) -> np.ndarray:
    """The one resize of every decoded image (a PIL image, or an (H, W, 3) uint8 array): RGB, bilinear, to
    size x size, as uint8."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    image = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0)
    return np.asarray(image, dtype=np.uint8)


def failure_reason(error: Exception) -> str:
    """Why an image did not decode, for the skipped list: a DataError's own words (they name the cause and the
    fix, e.g. a multi-frame DICOM), else the error's type and message."""
    return str(error) if isinstance(error, DataError) else f"{type(error).__name__}: {error}"


@dataclass(frozen=True)
class CachedSplit:
    """A decoded split on disk: trials open it with `images()` (memory-mapped, read-only).

    `loaded()` reads it into memory to travel with the split: on a Ray cluster, trials on
    other machines get it from Ray's object store and never read this machine's disk.
    """

    images_path: str
    labels: np.ndarray = field(repr=False)
    loaded_images: np.ndarray | None = field(default=None, repr=False)

    def images(self) -> np.ndarray:
        if self.loaded_images is not None:
            return self.loaded_images
        return np.load(self.images_path, mmap_mode="r")

    def loaded(self) -> CachedSplit:
        """The split with its images in memory (Ray shares such an array zero-copy between a node's trials)."""
        return replace(self, loaded_images=np.load(self.images_path))

    @property
    def nbytes(self) -> int:
        """The decoded images' size: what `loaded()` holds in memory."""
        return int(np.prod(self.images().shape))

    def __len__(self) -> int:
        return len(self.labels)


def cache_key(index: DatasetIndex, split: str, size: int) -> str:
    """Changes whenever a file of the split, its label, or the image size changes."""
    return split_digest(index, split, size)


def data_digest(index: DatasetIndex) -> str:
    """The data's fingerprint (every split's files, labels, sizes and times): MLflow's dataset digest."""
    splits = "".join(
        f"{split}:{split_digest(index, split)}\n" for split in (*SPLITS, EXTERNAL) if split in index.splits
    )
    return hashlib.sha256(splits.encode()).hexdigest()[:20]


def split_digest(index: DatasetIndex, split: str, *header: object) -> str:
    # A manifest's own bytes count too: a changed group or split column is another dataset, even where a
    # split's files stay the same.
    source = [index.source, manifest_digest(index.source)] if index.is_manifest else [index.source]
    # Another --window decodes other pixels from the same files; without one, the digests stay as they were.
    window = [] if index.window is None else [list(index.window)]
    digest = hashlib.sha256(json.dumps([*source, *header, index.classes, *window]).encode())
    root = None if index.is_synthetic else index.root
    for sample in index.splits[split]:
        stamp = ""
        if root is not None:
            stat = (root / sample.key).stat()
            stamp = f"{stat.st_size}:{stat.st_mtime_ns}"
        digest.update(f"{sample.key}\0{sample.label}\0{stamp}\n".encode())
    return digest.hexdigest()[:20]


def cache_path(index: DatasetIndex, split: str, size: int, cache_dir: str | os.PathLike) -> Path:
    return Path(cache_dir) / f"{split}-{size}px-{cache_key(index, split, size)}.npy"


def cache_split(index: DatasetIndex, split: str, size: int, cache_dir: str | os.PathLike) -> CachedSplit:
    """Decode a split once into cache_dir (reused while its files are unchanged).

    The array is written under a temporary name and renamed when whole, so no failure
    (a corrupt image, a full disk, Ctrl-C) leaves a partial cache behind or one that looks whole.
    """
    path = cache_path(index, split, size, cache_dir)
    labels = index.labels(split)
    if path.exists():
        return CachedSplit(str(path), labels)
    path.parent.mkdir(parents=True, exist_ok=True)
    samples = index.splits[split]
    partial = path.with_suffix(f".partial-{os.getpid()}.npy")
    try:
        images = allocated_memmap(partial, (len(samples), size, size, 3))
        failures = decode_into(images, index, samples, size)
        images.flush()
        del images
        if failures:
            raise CorruptImages(failures)
        os.replace(partial, path)
    except OSError as error:
        partial.unlink(missing_ok=True)
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DataError(
                f"the disk of the image cache {path.parent} is full: free space, or pass --cache-dir "
                f"on a larger disk, or a smaller --img-size"
            ) from None
        raise
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return CachedSplit(str(path), labels)


def allocated_memmap(path: Path, shape: tuple[int, ...]) -> np.memmap:
    """A writable .npy memory map whose disk blocks are all allocated before anything is written.

    numpy creates the file sparse, and a write through the map into a sparse file on a
    full disk kills the process with SIGBUS, which no `except` can catch; allocating
    first turns a full disk into an OSError here instead.
    """
    images = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape)
    if hasattr(os, "posix_fallocate"):  # Linux and most Unix; elsewhere a write error is an OSError anyway
        with open(path, "r+b") as file:
            os.posix_fallocate(file.fileno(), 0, os.fstat(file.fileno()).st_size)
    return images


def check_free_space(
    index: DatasetIndex, splits: tuple[str, ...], size: int, cache_dir: str | os.PathLike, also: tuple[int, ...] = ()
) -> None:
    """Refuse at once when the splits still to decode, at `size` and at each size of `also` (a resolution
    schedule's smaller ones), cannot fit on the cache's disk."""
    sizes = (*also, size)
    needed = sum(
        len(index.splits[split]) * each * each * 3
        for each in sizes
        for split in splits
        if not cache_path(index, split, each, cache_dir).exists()
    )
    where = existing_ancestor(Path(cache_dir))
    free = shutil.disk_usage(where).free
    if needed > free:
        named = ", ".join(map(str, sizes[:-1])) + " and " * bool(also) + str(size)
        raise DataError(
            f"the image cache needs {megabytes(needed)} for {named} px images but {where} has {megabytes(free)} "
            f"free: free space, pass --cache-dir on a larger disk, or a smaller --img-size"
        )


def existing_ancestor(path: Path) -> Path:
    path = path.resolve()
    while not path.exists():
        path = path.parent
    return path


def megabytes(count: int) -> str:
    return f"{count / 2**20:,.0f} MB" if count >= 2**20 else f"{count / 2**20:.2f} MB"


class CorruptImages(DataError):
    def __init__(self, failures: list[tuple[str, str]]):
        self.failures = failures
        named = ", ".join(key for key, _ in failures[:3])
        super().__init__(f"{len(failures)} image(s) could not be decoded (e.g. {named})")


def decode_into(images: np.ndarray, index: DatasetIndex, samples: list[Sample], size: int) -> list[tuple[str, str]]:
    """Fill images[i] for every sample; return (key, error) of the ones that failed."""
    if index.is_synthetic:
        for i, sample in enumerate(samples):
            images[i] = synthetic_image(sample.key, len(index.classes), size)
        return []
    root = index.root

    def decode(i: int) -> tuple[str, str] | None:
        try:
            images[i] = decode_image(root / samples[i].key, size, index.window)
            return None
        except Exception as error:  # PIL raises many types for broken files
            return samples[i].key, failure_reason(error)

    # PIL releases the GIL while decoding and resizing, so threads use every core.
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        return [f for f in pool.map(decode, range(len(samples))) if f is not None]


def drop_samples(index: DatasetIndex, keys: set[str]) -> DatasetIndex:
    splits = {split: [s for s in samples if s.key not in keys] for split, samples in index.splits.items()}
    return replace(index, splits=splits)


def prepare_splits(
    index: DatasetIndex, splits: tuple[str, ...], size: int, cache_dir: str | os.PathLike, also: tuple[int, ...] = ()
) -> tuple[DatasetIndex, dict[str, CachedSplit], list[str]]:
    """Cache the given splits, dropping images that fail to decode (returned by key). `also`: smaller sizes the
    splits will be cached at too (cache_resized), counted now in the check of the disk's free space."""
    skipped: list[str] = []
    check_free_space(index, splits, size, cache_dir, also)
    while True:
        try:
            return index, {split: cache_split(index, split, size, cache_dir) for split in splits}, skipped
        except CorruptImages as corrupt:
            bad = {key for key, _ in corrupt.failures}
            skipped += sorted(bad)
            index = drop_samples(index, bad)
            counts = Counter(s.label for split in splits for s in index.splits[split])
            empty = [c for label, c in enumerate(index.classes) if counts[label] == 0]
            if empty:
                raise DataError(
                    f"every image of class(es) {', '.join(empty)} failed to decode: check those files"
                ) from None


def cache_resized(
    index: DatasetIndex, sizes: tuple[int, ...], cache_dir: str | os.PathLike
) -> dict[int, tuple[CachedSplit, CachedSplit]]:
    """Train and val decoded at each of `sizes` (a resolution schedule's smaller ones), from an index that
    prepare_splits has cleared of the images that would not decode."""
    return {
        size: (cache_split(index, "train", size, cache_dir), cache_split(index, "val", size, cache_dir))
        for size in sizes
    }
