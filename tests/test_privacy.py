"""No patient data leaves the machine's images: patient ids reach the stores only as salted hashes.

First the salt (its variable, its file made once and owner-only), the hash, and each writer that
names patients (split.json, the card's split, the manifest's refusals, a DICOM file's skip reason),
called directly (final.py's warning: tests/test_retrain_split.py). Then a real study and its final.py,
on a manifest of PNGs whose group column holds planted patient ids and on class folders of DICOM files
whose PatientID does, the images' own metadata (PNG text, DICOM header) holding a planted name, birth
date, accession number and institution: every file the two commands wrote is searched for the planted
values (and the salt), byte by byte, in the forms they could take (slow).
"""

from __future__ import annotations

import base64
import json
import stat
import time
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
from helpers import run_script, structured_image, write_manifest

from search.final_model.card import split_method
from search.tracking.study_run import split_record
from trainables.data import SPLITS, DataError, DatasetIndex, Sample, decode_into, index_source
from trainables.privacy import SALT_ENV, SaltError, patient_hash, patient_hashes, patient_salt, salt_path

PATIENT_ID = "ZZPID-4711"
"""Planted as the prefix of every patient id: no store may hold it in any form."""
PLANTED = {
    "PatientID": PATIENT_ID,
    "PatientName": "ZZPLANTED^NAME",
    "PatientBirthDate": "19010203",
    "AccessionNumber": "ZZACC-0815",
    "InstitutionName": "ZZPLANTED HOSPITAL",
}
"""Identifying values, planted in the images' own metadata (a DICOM header, a PNG's text chunks)."""
CLASSES, PATIENTS, IMAGES = ("benign", "malignant"), 7, 2
"""Per class 7 patients of 2 images: the split by patient has patients for train, val and test."""


@pytest.fixture
def own_salt_file(tmp_path, monkeypatch) -> Path:
    """No HPO_PATIENT_SALT, and a configuration folder of the test's own: the salt comes from a file made there."""
    monkeypatch.delenv(SALT_ENV, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    return tmp_path / "config" / "hpo-classifiers" / "patient-salt"


# ---------------------------------------------------------------- the salt and the hash


def test_a_patient_hash_is_keyed_by_the_salt_and_stable():
    first = patient_hash(PATIENT_ID, b"salt one")
    assert first == patient_hash(PATIENT_ID, b"salt one")  # one patient, one hash: studies can be compared
    assert first != patient_hash(PATIENT_ID, b"salt two") and first != patient_hash(PATIENT_ID + "0", b"salt one")
    assert first.startswith("p-") and len(first) == 18 and int(first[2:], 16) >= 0
    assert patient_hashes({"b", "a"}, b"s") == sorted([patient_hash("a", b"s"), patient_hash("b", b"s")])


def test_the_salt_file_is_made_once_readable_by_its_owner_only(own_salt_file):
    salt = patient_salt()
    assert salt_path() == own_salt_file and own_salt_file.is_file()
    assert stat.S_IMODE(own_salt_file.stat().st_mode) == 0o600
    assert len(salt) == 64 and patient_salt() == salt  # read back, never made again
    assert [p.name for p in own_salt_file.parent.iterdir()] == ["patient-salt"]  # no draft left beside it


def test_the_variable_overrides_the_file_and_an_empty_one_is_refused(own_salt_file, monkeypatch):
    monkeypatch.setenv(SALT_ENV, "a colleague's salt\n")  # pasted with its newline, as `cat` shows the file
    assert patient_salt() == b"a colleague's salt"
    assert not own_salt_file.exists()  # a given salt makes no file
    monkeypatch.setenv(SALT_ENV, " ")
    with pytest.raises(SaltError, match=f"^{SALT_ENV} is set but empty: set it"):
        patient_salt()


def test_a_salt_that_cannot_be_made_or_is_empty_is_refused_in_one_line(own_salt_file, tmp_path, monkeypatch):
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "a-file"))  # a file where the folder would go
    with pytest.raises(SaltError) as caught:
        patient_salt()
    assert "cannot be read or made" in str(caught.value) and "\n" not in str(caught.value)
    assert isinstance(caught.value, DataError)  # the indexers' refusal: one line, exit 2
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    own_salt_file.parent.mkdir(parents=True)
    own_salt_file.write_text("\n")
    with pytest.raises(SaltError, match="is empty: put back the salt"):
        patient_salt()


# ---------------------------------------------------------------- the writers


def planted_manifest(root: Path) -> Path:
    """Images named neutrally (names are recorded as given), with a planted name and birth date in their PNG
    metadata; a manifest whose group column holds planted patient ids."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    metadata = PngInfo()
    for key, value in PLANTED.items():
        metadata.add_text(key, value)
    (root / "scans").mkdir(parents=True)
    rows, number = [], 0
    for label, name in enumerate(CLASSES):
        for patient in range(PATIENTS):
            for _ in range(IMAGES):
                path = f"scans/image{number:03d}.png"
                Image.fromarray(structured_image(number, 32)).save(root / path, pnginfo=metadata)
                rows.append(f"{path},{name},{PATIENT_ID}-{label}{patient:02d}")
                number += 1
    return write_manifest(root / "manifest.csv", "path,label,group", rows)


def planted_dicom_folder(root: Path) -> Path:
    """Class folders of DICOM files (named neutrally) whose headers hold planted identifying values, the
    PatientID a planted id per patient: the folder is split by it."""
    from helpers.dicom import write_dicom

    number = 0
    for label, name in enumerate(CLASSES):
        for patient in range(PATIENTS):
            for _ in range(IMAGES):
                attributes = {**PLANTED, "PatientID": f"{PATIENT_ID}-{label}{patient:02d}"}
                pixels = structured_image(number, 32)[..., 0]
                write_dicom(root / name / f"image{number:03d}.dcm", pixels, **attributes)
                number += 1
    return root


SOURCES = {"manifest": planted_manifest, "dicom": planted_dicom_folder}
"""A manifest's group column, a DICOM folder's PatientID: the two ways a patient id comes in."""


@pytest.mark.parametrize("source", SOURCES)
def test_split_json_names_each_split_s_patients_by_their_hashes_only(tmp_path, source):
    index = index_source(SOURCES[source](tmp_path / "data"), seed=0)
    record = split_record(index, seed=0)
    assert PATIENT_ID not in json.dumps(record)
    assert PATIENT_ID not in split_method(index, seed=0, smoke=False)  # the card's split: counts of patients
    for split in SPLITS:
        assert record[split]["groups"] == patient_hashes(index.groups(split), patient_salt())
        assert len(record[split]["groups"]) == len(index.groups(split)) > 0


def test_a_refusal_names_patients_by_their_hashes(tmp_path):
    manifest = planted_manifest(tmp_path / "data")
    rows = manifest.read_text().splitlines()
    kept = [row for row in rows if not row.endswith(tuple(f"-1{patient:02d}" for patient in range(2, PATIENTS)))]
    manifest.write_text("\n".join(kept) + "\n")  # malignant: 2 patients, too few for three splits
    with pytest.raises(DataError) as caught:
        index_source(manifest, seed=0)
    message = str(caught.value)
    assert PATIENT_ID not in message and patient_hash(f"{PATIENT_ID}-100", patient_salt()) in message, message


def test_a_dicom_file_that_does_not_decode_is_skipped_for_a_reason_that_names_nothing_of_its_header(tmp_path):
    from helpers.dicom import write_dicom

    folder = tmp_path / "data" / "a"
    write_dicom(folder / "no-pixels.dcm", None, **PLANTED)
    write_dicom(folder / "frames.dcm", np.zeros((2, 8, 8), np.uint8), **PLANTED)
    whole = (folder / "frames.dcm").read_bytes()
    (folder / "cut.dcm").write_bytes(whole[: len(whole) - 40])  # its pixels cut short
    (folder / "header-only.dcm").write_bytes(whole[:300])  # cut inside its header
    samples = [Sample(f"a/{path.name}", 0) for path in sorted(folder.iterdir())]
    index = DatasetIndex(str(tmp_path / "data"), ["a"], {"train": samples})
    failures = decode_into(np.zeros((len(samples), 8, 8, 3), np.uint8), index, samples, 8)
    assert len(failures) == len(samples)
    assert not planted_in(repr(failures).encode(), list(PLANTED.values())), failures


# ---------------------------------------------------------------- a real study, every store searched


def forms(value: str) -> list[bytes]:
    """The forms a value could take in a file, lower-case (the files are searched lower-cased): as text (UTF-8,
    UTF-16), hex, URL-encoded."""
    text = value.encode()
    return [text.lower(), text.hex().encode(), quote(value).encode().lower(), value.encode("utf-16-le").lower()]


def base64_forms(value: str) -> list[bytes]:
    """The value's base64, at each of the three offsets a longer text could start it at: the characters that
    encode its bytes alone (case-sensitive)."""
    text, found = value.encode(), []
    for offset in range(3):
        encoded = base64.b64encode(bytes(offset) + text)
        found.append(encoded[-(-8 * offset // 6) : 8 * (offset + len(text)) // 6])
    return found


def planted_in(data: bytes, values: list[str]) -> list[str]:
    """Which of the values the bytes hold, in any of their forms."""
    lowered = data.lower()
    return [
        value
        for value in values
        if any(form in lowered for form in forms(value)) or any(form in data for form in base64_forms(value))
    ]


def leaks_under(folder: Path, values: list[str], inputs: tuple[str, ...]) -> tuple[dict[str, list[str]], list[Path]]:
    """{file: the planted values it holds} for every file under folder but the `inputs` sub-folders, and the files
    searched (relative to folder)."""
    found, searched = {}, []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if path.is_file() and not path.is_symlink() and relative.parts[0] not in inputs:
            searched.append(relative)
            hits = planted_in(path.read_bytes(), values)
            if hits:
                found[str(relative)] = hits
    return found, searched


@pytest.mark.slow
@pytest.mark.parametrize("source", SOURCES)
def test_no_planted_patient_value_reaches_any_store_of_a_study_and_its_final_model(tmp_path, own_salt_file, source):
    """A study (1 trial, 1 epoch, 32 px) and final.py (registered), every store under tmp_path: the MLflow
    database and artifacts, the Optuna database, Ray's trial folders, the image cache, final.py's results."""
    data = SOURCES[source](tmp_path / "data")
    stores = tmp_path / "stores"
    uri = f"sqlite:///{stores}/mlflow/mlflow.db"
    common = ["--tracking-uri", uri, "--cache-dir", str(stores / "cache"), "--no-pretrained"]
    started = time.perf_counter()
    study = run_script(
        "run.py",
        *["--model", "vit", "--smoke", "--trials", "1", "--epochs", "1", "--seed", "0", "--name", "privacy"],
        *["--data", str(data), "--storage-path", str(stores / "ray"), "--gpus-per-trial", "0"],
        *["--optuna-storage", f"sqlite:///{stores}/mlflow/optuna.db", *common],
        cwd=tmp_path,
    )
    assert study.returncode == 0, study.stdout[-3000:] + study.stderr[-3000:]
    final = run_script("final.py", "--study", "privacy", "--out", str(stores / "final"), *common, cwd=tmp_path)
    assert final.returncode == 0, final.stdout[-3000:] + final.stderr[-3000:]
    assert "registered as" in final.stdout  # the registry's version, its card and tags, among the stores
    seconds = time.perf_counter() - started

    salt = own_salt_file.read_text().strip()
    values = [*PLANTED.values(), salt]  # the salt is the machine's secret: in no store either
    # Every file the two commands wrote, wherever (the stores, and anything beside them in the working folder).
    leaks, searched = leaks_under(tmp_path, values, inputs=("data", "config"))
    assert not leaks, leaks
    stores_searched = {path.parts[1] for path in searched if path.parts[0] == "stores" and len(path.parts) > 2}
    assert {"mlflow", "ray", "cache", "final"} <= stores_searched, searched
    assert {Path("stores/mlflow/mlflow.db"), Path("stores/mlflow/optuna.db")} <= set(searched)
    assert any(path.name == "model.pt" for path in searched) and any(path.suffix == ".npy" for path in searched)
    console = (study.stdout + study.stderr + final.stdout + final.stderr).encode()
    assert not planted_in(console, values)
    # The search finds what is there: every planted value in an input image's own metadata.
    (image,) = (tmp_path / "data").rglob("image000.*")
    assert planted_in(image.read_bytes(), values) == list(PLANTED.values())

    (split_file,) = (stores / "mlflow" / "artifacts").rglob("split.json")
    recorded = json.loads(split_file.read_text())
    index = index_source(data, seed=0)  # by the same salt: this process reads the file the study made
    patients = {split: {patient_hash(group, salt.encode()) for group in index.groups(split)} for split in SPLITS}
    assert all(set(recorded[split]["groups"]) <= patients[split] and recorded[split]["groups"] for split in SPLITS)
    print(f"{source}: study and final.py {seconds:.0f} s; {len(searched)} files searched")


def test_the_planted_forms_are_found_where_they_are(tmp_path):
    """The search itself: each form of a planted value is found, in any case, and a near miss is not."""
    name = PLANTED["PatientName"]
    for written in (
        name.encode(),
        name.lower().encode(),
        name.encode().hex().upper().encode(),
        quote(name).encode(),
        name.encode("utf-16-le"),
        base64.b64encode(b"x" + name.encode() + b"yz"),
        base64.b64encode(b"xy" + name.encode()),
    ):
        assert planted_in(b"\x00before " + written + b" after\xff", [name]) == [name], written
    assert planted_in(b"ZZPLANTED NAME", [name]) == []


def test_paths_that_name_their_patient_are_found_and_the_warning_names_no_id():
    from search.study.preflight import patient_in_paths_warning
    from trainables.data import Sample
    from trainables.privacy import paths_naming_their_patient

    samples = [
        Sample("benign/ZZPID-4711/scan_1.dcm", 0, "ZZPID-4711"),  # a folder per patient, as PACS exports often are
        Sample("benign/scan_2.dcm", 0, "ZZPID-0815"),
        Sample("malignant/7/scan_3.dcm", 1, "7"),  # too short an id to tell from any other digit
        Sample("malignant/scan_4.dcm", 1, None),
    ]
    named = paths_naming_their_patient(samples)
    assert named == ["benign/ZZPID-4711/scan_1.dcm"]
    line = patient_in_paths_warning(named)
    assert line.startswith("warning: 1 image path(s) contain their patient's id") and "ZZPID" not in line
