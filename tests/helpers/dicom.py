"""DICOM files for tests, written by pydicom: valid Part 10 files, uncompressed or in a compressed transfer syntax.

    write_dicom(tmp_path / "ct.dcm", hounsfield_plus_1024, bits_stored=12, RescaleSlope=1, RescaleIntercept=-1024,
                WindowCenter=40, WindowWidth=400, PatientID="P001")

Compressed syntaxes are encoded by pydicom's encoders: RLE Lossless by pydicom itself, JPEG 2000 (lossless) by
pylibjpeg-openjpeg. JPEG-LS would need pyjpegls, which is not installed (decoding it needs only pylibjpeg-libjpeg).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid


def write_dicom(
    path: Path,
    pixels: np.ndarray | None,
    *,
    transfer_syntax: str = ExplicitVRLittleEndian,
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    **attributes: Any,
) -> Path:
    """A DICOM file of `pixels` at `path`: (rows, cols) greyscale, (rows, cols, 3) colour, (frames, rows, cols) a
    multi-frame image; None: a file without pixel data (as a report or a presentation state is). `attributes`:
    any further data elements by keyword (PatientID, RescaleSlope, WindowCenter, VOILUTSequence, ...), set before
    the pixels are compressed into `transfer_syntax`. Signed pixels (int16) are stored as such."""
    dataset = Dataset()
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset.SOPClassUID = SecondaryCaptureImageStorage
    dataset.SOPInstanceUID = generate_uid()
    dataset.StudyInstanceUID = generate_uid()
    dataset.SeriesInstanceUID = generate_uid()
    dataset.Modality = "OT"
    if pixels is not None:
        dataset.set_pixel_data(pixels, photometric, bits_stored or 8 * pixels.dtype.itemsize)
    for keyword, value in attributes.items():
        setattr(dataset, keyword, value)
    if pixels is not None and transfer_syntax != ExplicitVRLittleEndian:
        dataset.compress(transfer_syntax, generate_instance_uid=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    dataset.save_as(path, enforce_file_format=True)
    return path


def voi_lut(first_mapped: int, bits: int, entries: list[int]) -> Sequence:
    """A VOI LUT Sequence of one LUT: input values from `first_mapped` on map to `entries` (of `bits` bits each);
    below it to the first entry, above its end to the last."""
    item = Dataset()
    item.add_new("LUTDescriptor", "US", [len(entries), first_mapped, bits])
    item.add_new("LUTData", "US", entries)  # an ambiguous VR (US or OW): say which
    return Sequence([item])


def write_dicom_folder(
    root: Path, patients: dict[str, tuple[str, int]], size: int = 32, **attributes: Any
) -> dict[str, list[Path]]:
    """root/<class>/<patient>_<n>.dcm: `count` CT-like images per patient (`patients`: id -> (class, count)), each
    with its PatientID, 12 bits stored with a rescale to Hounsfield units (slope 1, intercept -1024) and a soft-tissue
    window (40, 400); a class's images alike (a brightness and a stripe of its own), the classes apart, every image
    distinct. `attributes`: more data elements for every file (PatientName, PatientBirthDate, ...). Returns each
    patient's files."""
    classes = sorted({label for label, _ in patients.values()})
    rng = np.random.default_rng(0)
    written: dict[str, list[Path]] = {}
    for patient, (label, count) in patients.items():
        number = classes.index(label)
        for i in range(count):
            hounsfield = rng.normal(-150 + 120 * number, 40, (size, size))
            hounsfield[:, number * 4 : number * 4 + 3] += 250  # a stripe where the class says
            stored = np.clip(hounsfield + 1024, 0, 4095).astype(np.uint16)
            path = root / label / f"{patient}_{i}.dcm"
            write_dicom(path, stored, bits_stored=12, PatientID=patient, RescaleSlope=1, RescaleIntercept=-1024,
                        WindowCenter=40, WindowWidth=400, **attributes)  # fmt: skip
            written.setdefault(patient, []).append(path)
    return written
