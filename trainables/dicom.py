"""DICOM images as a radiologist sees them, decoded to the RGB uint8 array every other image becomes.

pydicom reads the file; compressed pixel data is decoded by the handlers pip installed with it (pylibjpeg with its
libjpeg and openjpeg plugins: JPEG, JPEG-LS, JPEG 2000; RLE Lossless is pydicom's own). The stored values then go
through the display pipeline of DICOM (PS3.3 C.11), in its order:

1. the Modality LUT: rescale slope and intercept (a CT's stored values become Hounsfield units);
2. a window on those values: the one given (run.py --window CENTER,WIDTH), else the file's VOI LUT or its first
   window (WindowCenter/WindowWidth), else the image's own min..max;
3. MONOCHROME1 (low values shown white) inverted;
4. only then cut to 8 bits, so that a 12- or 16-bit image keeps the contrast of its window.

Colour images (RGB; YBR converted to RGB by pydicom; PALETTE COLOR through its palette) pass through. The resize is
trainables.data.decode_image's. A file that is no single image (multi-frame, no pixel data) is refused with why.
The windowing is a few pure functions on arrays (linear_window, stretched, inverted, eight_bit), tested as such.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from trainables.config import MIN_WINDOW_WIDTH
from trainables.data import DataError, resized

if TYPE_CHECKING:  # pydicom loads with the first DICOM file: other sources never import it
    from pydicom import Dataset

Window = tuple[float, float]
"""(center, width) of a linear window, in the values the Modality LUT gives (a CT's Hounsfield units)."""
MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
PIXEL_DATA = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


class DicomRefused(DataError):
    """A DICOM file that holds no single 2-D image to classify; the message says why and what to do instead."""


def decode_dicom(path: Path, size: int, window: Window | None = None) -> np.ndarray:
    """A DICOM file as RGB uint8, size x size: the Modality LUT, then `window` (else the file's VOI LUT or window,
    else the image's min..max), MONOCHROME1 inverted, 8 bits, resized as decode_image resizes."""
    import pydicom

    dataset = pydicom.dcmread(path)
    require_one_image(dataset)
    pixels = dataset.pixel_array
    photometric = str(dataset.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric in MONOCHROME:
        grey = eight_bit(displayed(dataset, pixels, window, photometric))
        rgb = np.repeat(grey[..., None], 3, axis=-1)
    else:
        rgb = colour(dataset, pixels, photometric)
    return resized(rgb, size)


def require_one_image(dataset: Dataset) -> None:
    """Refuse what is no single image: several frames (a cine loop, a volume in one file) or no pixels at all."""
    frames = int(dataset.get("NumberOfFrames") or 1)
    if frames > 1:
        raise DicomRefused(f"multi-frame DICOM ({frames} frames): export one frame per file")
    if not any(keyword in dataset for keyword in PIXEL_DATA):
        kind = getattr(dataset.get("SOPClassUID"), "name", None) or "no image"
        raise DicomRefused(f"DICOM without pixel data ({kind}): only image files can be classified")


def displayed(dataset: Dataset, pixels: np.ndarray, window: Window | None, photometric: str) -> np.ndarray:
    """A greyscale image's values as shown, in [0, 1]: Modality LUT, window, MONOCHROME1 inverted."""
    from pydicom.pixels import apply_modality_lut

    values = apply_modality_lut(pixels, dataset)
    if window is not None:
        shown = linear_window(values, *window)
    elif has_voi(dataset):
        shown = file_voi(values, dataset)
    else:
        shown = stretched(values, float(values.min()), float(values.max()))
    return inverted(shown) if photometric == "MONOCHROME1" else shown


def has_voi(dataset: Dataset) -> bool:
    """Whether the file says how to show itself: a VOI LUT, or a window (center and width)."""
    lut = dataset.get("VOILUTSequence")
    has_lut = bool(lut) and "LUTDescriptor" in lut[0] and "LUTData" in lut[0]
    return has_lut or ("WindowCenter" in dataset and "WindowWidth" in dataset)


def file_voi(values: np.ndarray, dataset: Dataset) -> np.ndarray:
    """The file's own VOI (its VOI LUT where it has one, else its first window) by pydicom, in [0, 1].

    pydicom gives a LUT's output in the LUT's units and a window's in a range of its own making; each is stretched
    from the lowest to the highest value that VOI can give: the LUT's entries, or the window's two ends."""
    from pydicom.pixels import apply_voi_lut

    if dataset.get("VOILUTSequence") and "LUTData" in dataset.VOILUTSequence[0]:
        # A VOI LUT indexes by integer: modality values (floats after a rescale) are whole numbers by DICOM's rules.
        shown = apply_voi_lut(np.rint(values).astype(np.int64), dataset, index=0)
        descriptor = dataset.VOILUTSequence[0].LUTDescriptor
        entries = apply_voi_lut(np.arange(descriptor[1], descriptor[1] + (descriptor[0] or 2**16)), dataset, index=0)
        low, high = float(entries.min()), float(entries.max())
    else:
        shown = apply_voi_lut(values, dataset, index=0)
        low, high = (float(end) for end in apply_voi_lut(np.array([-np.inf, np.inf]), dataset, index=0))
    return stretched(shown, low, high)


def colour(dataset: Dataset, pixels: np.ndarray, photometric: str) -> np.ndarray:
    """A colour image as RGB uint8: RGB as it is (YBR pydicom has converted to RGB), a palette applied; 16-bit
    colour scaled by its bits."""
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        pixels = apply_color_lut(pixels, dataset)
        bits = 8 * pixels.dtype.itemsize
    elif photometric == "RGB" or photometric.startswith("YBR"):
        bits = int(dataset.get("BitsStored") or 8 * pixels.dtype.itemsize)
    else:
        raise DicomRefused(
            f"DICOM of photometric interpretation {photometric}: not read; export it as MONOCHROME2 or RGB"
        )
    if pixels.dtype == np.uint8:
        return pixels
    return eight_bit(stretched(pixels, 0.0, float(2**bits - 1)))


# ---------------------------------------------------------------- windowing: pure functions on arrays


def linear_window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM's linear window (PS3.3 C.11.2.1.2.1), in [0, 1]: 0 at and below center - 0.5 - (width - 1) / 2, 1
    above center - 0.5 + (width - 1) / 2, a straight line between. The same function pydicom applies to a file's
    window, so that --window with the file's own values shows the image as the file does."""
    if not width >= MIN_WINDOW_WIDTH:
        raise ValueError(f"a window's width is at least {MIN_WINDOW_WIDTH:g}, not {width}")
    values = np.asarray(values, dtype=np.float64)
    if width == 1:  # a threshold: the line between has no length
        return (values > center - 0.5).astype(np.float64)
    return np.clip((values - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)


def stretched(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """`values` from low..high to 0..1, clipped; a flat image (high == low) is black."""
    values = np.asarray(values, dtype=np.float64)
    if high <= low:
        return np.zeros_like(values)
    return np.clip((values - low) / (high - low), 0.0, 1.0)


def inverted(shown: np.ndarray) -> np.ndarray:
    """MONOCHROME1: the lowest value is shown white."""
    return 1.0 - shown


def eight_bit(shown: np.ndarray) -> np.ndarray:
    """Values in [0, 1] as uint8 0..255, rounded."""
    return np.rint(np.clip(shown, 0.0, 1.0) * 255.0).astype(np.uint8)


# ---------------------------------------------------------------- the patient, for the split


def patient_of(path: str | os.PathLike) -> str | None:
    """The file's PatientID (stripped), or None where it has none or its header cannot be read (such a file is
    refused with its reason when it is decoded). Reads the header only: never the pixels."""
    import pydicom

    try:
        dataset = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["PatientID"])
    except Exception:  # pydicom raises many types for a file that is no DICOM; decoding names the cause
        return None
    value = str(dataset.get("PatientID") or "").strip()
    return value or None


def patients_of(paths: list[Path]) -> list[str | None]:
    """patient_of for each file, in order, read by threads (the reads wait on the disk, not on Python)."""
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        return list(pool.map(patient_of, paths))
