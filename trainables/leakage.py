"""Leakage: the same image, or nearly the same, in two of train, val and test.

Two scans of one patient, an image saved twice under two names, a re-exported JPEG: a
copy of a training image in the test split inflates the test score. Each decoded image
(uint8, (H, W, 3), as the cache holds it) gets a fingerprint:

- an exact hash: the first 8 bytes of the BLAKE2b digest of its decoded pixels.
  Identical pixels, identical hash; a false match among a million images has a chance
  of about 3e-8. Exact copies are found by sorting the hashes, never by comparing all pairs.
- a perceptual hash (pHash): the image in grey, averaged down to a 32 x 32 thumbnail,
  its 2-D DCT, and the signs of its 8 x 8 lowest frequencies against their median. A
  brightness shift moves only the DC term, JPEG recompression only high frequencies,
  so a copy stays within a bit or two; unrelated images differ in about 32 of 64.
- that grey thumbnail (uint8), which confirms a near pair: the hash sees only the
  lowest frequencies, so two images alike in their coarse layout but not in their
  detail (stripes of another phase, two chest X-rays of one view) can share it.

A near-duplicate is a pair whose perceptual hashes are within NEAR_BITS bits (compared
in blocks of XOR and popcount across two splits at a time) and whose thumbnails
correlate at MIN_CORRELATION or more (a brightness or contrast change keeps it at 1).
A mirrored copy is a pair that is one of these once one image is flipped: training flips
images (the hflip and vflip knobs), so a flipped copy of a test image is one the model
trains on. Its hash is that of the stored thumbnail flipped, and the flipped thumbnail
confirms it: nothing is decoded again and the stored fingerprints stay as they were.
Duplicates within one split are not leakage and are not looked for. Hashing and comparing
are numpy on arrays; `split_fingerprints` gets a split's images from the decoded cache
(or, for test, decodes them) and keeps their fingerprints beside the cache.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

import numpy as np

from trainables.data import CachedSplit, DatasetIndex, cache_key, decode_into

NEAR_BITS = 12
"""Perceptual hashes this many bits apart (of 64) or fewer make a near pair, if the thumbnails agree. The hash only
proposes candidates, the correlation decides: a low-contrast image re-saved as JPEG at quality 60 moves 8 to 10
bits (its low frequencies sit near their median, so they flip), while distinct images lie 16 or more apart."""
MIN_CORRELATION = 0.98
"""The thumbnails' correlation that confirms a near pair. Measured on structured 32 to 224 px images: a copy
re-saved as JPEG at quality 30, made brighter or more contrasted, or resized scores 0.994 or more; two distinct
images at most 0.57."""
THUMBNAIL = 32
"""The grey thumbnail's side: the DCT is taken of it, and it confirms near pairs."""
LOW_FREQUENCIES = 8
"""The square of lowest DCT frequencies that makes the 64 bits."""
VERSION = 1
"""In the fingerprints' file names: a change of the fingerprint makes the old files unread."""
FINGERPRINT_DIR = "hashes"
"""The fingerprints' folder inside the image cache."""
DECODE_CHUNK = 256
"""Images of a split without a decoded cache (test) decoded at once, to be fingerprinted."""
CHUNK_PIXELS = 1 << 22
"""Pixels fingerprinted at once (4 M: 48 MB as float32 RGB): the memory-mapped cache is read in slices."""
BLOCK_PAIRS = 1 << 18
"""Pairs of hashes compared at once (256 K: 2 MB of uint64, which stays in the CPU's cache: 2.5 times the speed of
4 M pairs at a time, measured on 14,000 x 3,000 hashes)."""
FLIPS = {"hflip": (-1,), "vflip": (-2,), "hflip+vflip": (-2, -1)}
"""The flips a mirrored copy is looked for under, named by the augmentation knobs that make them: the axes of a
thumbnail each reverses (-1 its columns: left-right; -2 its rows: upside down). Both knobs at once make both."""
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
BYTE_BITS = np.array([bin(byte).count("1") for byte in range(256)], dtype=np.uint8)


@dataclass(frozen=True)
class Fingerprints:
    """What the check keeps of each image of a split (about 1 KB an image)."""

    exact: np.ndarray
    """(N,) uint64: a hash of the decoded pixels."""
    perceptual: np.ndarray
    """(N,) uint64: the 64-bit pHash."""
    thumbnails: np.ndarray
    """(N, THUMBNAIL, THUMBNAIL) uint8: the grey thumbnails."""

    def __len__(self) -> int:
        return len(self.exact)

    def __getitem__(self, which: np.ndarray) -> Fingerprints:
        return Fingerprints(self.exact[which], self.perceptual[which], self.thumbnails[which])


@dataclass(frozen=True)
class Duplicate:
    """One pair of images in two different splits that look the same."""

    first_split: str
    first: int
    """The image's position in its split."""
    second_split: str
    second: int
    distance: int
    """Bits in which the perceptual hashes differ (0 to NEAR_BITS; for a mirrored copy, the first image's flipped)."""
    exact: bool
    """Identical decoded pixels."""
    flip: str = ""
    """A mirrored copy: the flip (a key of FLIPS) that turns the first image into the second; '' for none."""

    @property
    def kind(self) -> str:
        """'exact', 'near' or 'mirror' (a flipped copy, exact or near)."""
        return "exact" if self.exact else "mirror" if self.flip else "near"


# ---------------------------------------------------------------- fingerprints


def fingerprints(images: np.ndarray) -> Fingerprints:
    """The fingerprints of images (N, H, W, 3) uint8, a memory map included (read a slice at a time)."""
    parts = []
    per_chunk = max(1, CHUNK_PIXELS // (images.shape[1] * images.shape[2])) if len(images) else 1
    for start in range(0, len(images), per_chunk):
        chunk = np.ascontiguousarray(images[start : start + per_chunk])
        thumbnails = grey_thumbnails(chunk)
        parts.append(Fingerprints(exact_hashes(chunk), perceptual_hashes(thumbnails), quantised(thumbnails)))
    return joined(parts)


def joined(parts: list[Fingerprints]) -> Fingerprints:
    if not parts:
        return Fingerprints(
            np.zeros(0, np.uint64), np.zeros(0, np.uint64), np.zeros((0, THUMBNAIL, THUMBNAIL), np.uint8)
        )
    return Fingerprints(
        np.concatenate([part.exact for part in parts]),
        np.concatenate([part.perceptual for part in parts]),
        np.concatenate([part.thumbnails for part in parts]),
    )


def exact_hashes(images: np.ndarray) -> np.ndarray:
    return np.array(
        [int.from_bytes(hashlib.blake2b(image.tobytes(), digest_size=8).digest(), "little") for image in images],
        dtype=np.uint64,
    )


def grey_thumbnails(images: np.ndarray) -> np.ndarray:
    """(N, THUMBNAIL, THUMBNAIL) float32 grey."""
    # Channel by channel: ten times faster than a matmul, which would convert the whole chunk to float first.
    grey = sum(images[..., channel] * weight for channel, weight in enumerate(LUMA))  # (N, H, W) float32
    return bin_means(bin_means(grey, axis=2), axis=1)


def perceptual_hashes(thumbnails: np.ndarray) -> np.ndarray:
    """64-bit pHash of each thumbnail: its lowest DCT frequencies, above or below their median."""
    dct = dct_matrix(THUMBNAIL)[:LOW_FREQUENCIES]
    coefficients = (dct @ thumbnails @ dct.T).reshape(len(thumbnails), -1)  # (N, 64)
    median = np.median(coefficients[:, 1:], axis=1, keepdims=True)  # the DC term is brightness, not structure
    bits = coefficients > median
    return np.packbits(bits, axis=1, bitorder="little").view("<u8")[:, 0].astype(np.uint64)


def quantised(thumbnails: np.ndarray) -> np.ndarray:
    return np.rint(thumbnails).clip(0, 255).astype(np.uint8)


def bin_means(images: np.ndarray, axis: int) -> np.ndarray:
    """The images shrunk (or, below THUMBNAIL pixels, stretched) to THUMBNAIL along axis: each cell the mean of
    the pixels it covers, bins as equal as whole pixels allow. One pass of sums, whatever the image size."""
    size = images.shape[axis]
    if size % THUMBNAIL == 0:  # bins of one width (32, 64, 224 px...): strided adds, several times reduceat's speed
        factor = size // THUMBNAIL
        moved = np.moveaxis(images, axis, -1)
        bins = moved.reshape(*moved.shape[:-1], THUMBNAIL, factor)
        return np.moveaxis(sum(bins[..., k] for k in range(factor)) / np.float32(factor), -1, axis)
    starts = np.arange(THUMBNAIL) * size // THUMBNAIL
    if size < THUMBNAIL:  # each pixel repeated over the cells it spans
        return np.take(images, starts, axis=axis)
    widths = np.diff(np.append(starts, size)).astype(np.float32)
    shape = [1] * images.ndim
    shape[axis] = THUMBNAIL
    return np.add.reduceat(images, starts, axis=axis) / widths.reshape(shape)


def dct_matrix(size: int) -> np.ndarray:
    """The orthonormal DCT-II matrix: dct @ x transforms the columns of x."""
    k, n = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    matrix = np.cos(np.pi * (2 * n + 1) * k / (2 * size)) * np.sqrt(2 / size)
    matrix[0] /= np.sqrt(2)
    return matrix.astype(np.float32)


def split_fingerprints(
    index: DatasetIndex, split: str, size: int, cache_dir: str | os.PathLike, cached: CachedSplit | None = None
) -> tuple[Fingerprints, np.ndarray]:
    """A split's fingerprints and which of its images they hold (an image that would not decode has none).

    From its decoded cache where given (train and val), else decoded here chunk by chunk and never cached: the
    test split's pixels are fingerprinted without entering the cache that trials read, and its labels are not
    read. Kept under the cache's hashes/ by the split's cache key (the same files, the same fingerprints): a
    second study on the same data reads them in milliseconds.
    """
    path = Path(cache_dir) / FINGERPRINT_DIR / f"{split}-{size}px-{cache_key(index, split, size)}.v{VERSION}.npz"
    if path.exists():
        with np.load(path) as stored:
            prints = Fingerprints(stored["exact"], stored["perceptual"], stored["thumbnails"])
        return prints, np.ones(len(prints), dtype=bool)
    if cached is not None:
        prints, decoded = fingerprints(cached.images()), np.ones(len(cached), dtype=bool)
    else:
        prints, decoded = decoded_fingerprints(index, split, size)
    if decoded.all():  # a split with broken files is read again next time: final.py names them
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.stem}.partial-{os.getpid()}.npz")
        np.savez(partial, exact=prints.exact, perceptual=prints.perceptual, thumbnails=prints.thumbnails)
        os.replace(partial, path)  # whole or absent, as the image cache
    return prints, decoded


def decoded_fingerprints(index: DatasetIndex, split: str, size: int) -> tuple[Fingerprints, np.ndarray]:
    """The split's images decoded in memory, DECODE_CHUNK at a time, and fingerprinted: (fingerprints, decoded)."""
    samples = index.splits[split]
    parts, decoded = [], np.ones(len(samples), dtype=bool)
    for start in range(0, len(samples), DECODE_CHUNK):
        part = samples[start : start + DECODE_CHUNK]
        images = np.zeros((len(part), size, size, 3), dtype=np.uint8)
        failed = {key for key, _ in decode_into(images, index, part, size)}
        parts.append(fingerprints(images))
        decoded[start : start + len(part)] = [sample.key not in failed for sample in part]
    return joined(parts), decoded


# ---------------------------------------------------------------- comparing


def cross_split_duplicates(
    prints: dict[str, Fingerprints],
    near_bits: int = NEAR_BITS,
    min_correlation: float = MIN_CORRELATION,
    flips: tuple[str, ...] = (),
) -> list[Duplicate]:
    """Every pair of images in two different splits that are exact or near duplicates, or (for each of `flips`,
    keys of FLIPS) mirrored copies: exact ones first within each pair of splits, then near, then mirrored. A pair
    is reported once, under the first kind that finds it."""
    mirrored = {split: {flip: mirrored_hashes(prints[split], flip) for flip in flips} for split in list(prints)[:-1]}
    found = []
    for first, second in combinations(prints, 2):
        a, b = prints[first], prints[second]
        exact = set(exact_pairs(a.exact, b.exact))
        found += [
            Duplicate(first, i, second, j, hamming(a.perceptual[i], b.perceptual[j]), True) for i, j in sorted(exact)
        ]
        near = [
            Duplicate(first, i, second, j, distance, False)
            for i, j, distance in near_pairs(a.perceptual, b.perceptual, near_bits)
            if (i, j) not in exact and correlation(a.thumbnails[i], b.thumbnails[j]) >= min_correlation
        ]
        found += near
        seen = exact | {(d.first, d.second) for d in near}
        for flip in flips:  # a flip is its own inverse: the first split's images flipped, against the second's
            for i, j, distance in near_pairs(mirrored[first][flip], b.perceptual, near_bits):
                if (i, j) in seen or correlation(flipped(a.thumbnails[i], flip), b.thumbnails[j]) < min_correlation:
                    continue
                seen.add((i, j))
                found.append(Duplicate(first, i, second, j, distance, False, flip))
    return found


def mirrored_hashes(prints: Fingerprints, flip: str) -> np.ndarray:
    """The perceptual hashes of the images flipped, from their stored thumbnails (the thumbnail of a flipped image
    is the flipped thumbnail, to the rounding of its grey levels)."""
    return perceptual_hashes(flipped(prints.thumbnails, flip).astype(np.float32))


def flipped(thumbnails: np.ndarray, flip: str) -> np.ndarray:
    """Thumbnails (..., rows, columns) flipped as FLIPS[flip] says."""
    return np.flip(thumbnails, axis=FLIPS[flip])


def exact_pairs(a: np.ndarray, b: np.ndarray) -> Iterator[tuple[int, int]]:
    """(i, j) with a[i] == b[j], by sorting: O((len(a) + len(b)) log) however many images."""
    order = np.argsort(b, kind="stable")
    sorted_b = b[order]
    low = np.searchsorted(sorted_b, a, side="left")
    high = np.searchsorted(sorted_b, a, side="right")
    for i in np.flatnonzero(high > low):
        for position in range(low[i], high[i]):
            yield int(i), int(order[position])


def near_pairs(a: np.ndarray, b: np.ndarray, near_bits: int) -> Iterator[tuple[int, int, int]]:
    """(i, j, distance) with the perceptual hashes a[i] and b[j] at most near_bits apart: every pair is compared,
    a block of rows of a against all of b at a time (XOR and popcount), in bounded memory."""
    if len(a) == 0 or len(b) == 0:
        return
    rows = max(1, BLOCK_PAIRS // len(b))
    for start in range(0, len(a), rows):
        distances = popcount(a[start : start + rows, None] ^ b[None, :])
        for i, j in zip(*np.nonzero(distances <= near_bits), strict=True):
            yield start + int(i), int(j), int(distances[i, j])


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson's correlation of two thumbnails' pixels; 0 where one of them is flat (nothing to compare)."""
    x, y = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    x, y = x - x.mean(), y - y.mean()
    scale = np.sqrt((x @ x) * (y @ y))
    return float(x @ y / scale) if scale > 0 else 0.0


def hamming(x: np.uint64, y: np.uint64) -> int:
    return int(popcount(np.array([x ^ y]))[0])


def popcount(values: np.ndarray) -> np.ndarray:
    """The set bits of each uint64: numpy's own where it has it (numpy >= 2), else by byte table."""
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(values)
    return BYTE_BITS[values.view(np.uint8)].reshape(*values.shape, 8).sum(axis=-1, dtype=np.uint8)
