"""DICOM input: pixels as a radiologist sees them, refusals with their reason, the split by patient, --window from
run.py through the study and the model file to predict.py.

Every file is written by pydicom (tests/helpers/dicom.py), uncompressed or compressed (RLE Lossless by pydicom,
JPEG 2000 by pylibjpeg-openjpeg), and read back by the real decoders.
"""

from __future__ import annotations

import csv
import io
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import ROOT, run_script, study_config, write_image_folder
from helpers.dicom import voi_lut, write_dicom, write_dicom_folder
from pydicom.uid import JPEG2000Lossless, RLELossless

from search.records.study_config import StudyConfig
from search.records.winner import Winner, WinnerRefused
from search.study.config import changed_settings
from trainables import data
from trainables.checkpoint import ModelFile
from trainables.config import Hyperparameters
from trainables.data import (
    SPLITS,
    CorruptImages,
    cache_key,
    cache_split,
    decode_image,
    decode_into,
    index_source,
    prepare_splits,
)
from trainables.dicom import decode_dicom, eight_bit, inverted, linear_window, patient_of, stretched
from trainables.models import build_model
from trainables.spec import ModelSpec

HOUNSFIELD = [-1024, -24, 0, 40, 200, 976]
"""A row of CT values (air, fat-ish, water, soft tissue, contrast, bone) every decoding test shows."""
SOFT_TISSUE = (40.0, 400.0)
SHOWN_SOFT_TISSUE = [0, 87, 102, 128, 230, 255]
"""HOUNSFIELD in DICOM's linear window 40/400, 8 bits: (x - 39.5) / 399 + 0.5, clipped, times 255, rounded."""


def ct_rows(stored: list[int], dtype=np.uint16) -> np.ndarray:
    """Six identical rows of `stored`: the resize to 6 px leaves them as they are."""
    return np.array([stored] * 6, dtype=dtype)


def grey_row(path: Path, window: tuple[float, float] | None = None) -> list[int]:
    """The first row of the decoded image's red channel, at the file's own 6 px (grey: all channels alike)."""
    image = decode_dicom(path, 6, window)
    assert image.shape == (6, 6, 3) and image.dtype == np.uint8
    assert (image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all()
    return image[0, :, 0].tolist()


# ---------------------------------------------------------------- the windowing, on arrays


def test_the_linear_window_is_dicoms():
    """PS3.3 C.11.2.1.2.1 with center 40 and width 400: black at or below -160, white above 239, a line between."""
    shown = linear_window(np.array([-1024, -160, -159, 39.5, 40, 239, 240, 3000]), *SOFT_TISSUE)
    assert shown[0] == shown[1] == 0 and shown[-1] == shown[-2] == 1
    assert shown[2] == pytest.approx(1 / 399) and shown[3] == 0.5 and shown[5] == pytest.approx(1.0, abs=1 / 399)
    assert eight_bit(linear_window(np.array(HOUNSFIELD, dtype=float), *SOFT_TISSUE)).tolist() == SHOWN_SOFT_TISSUE
    assert linear_window(np.array([39, 40]), 40, 1).tolist() == [0, 1]  # width 1: a threshold at 39.5
    with pytest.raises(ValueError, match="at least 1"):
        linear_window(np.zeros(2), 40, 0.5)


def test_stretch_inversion_and_eight_bits():
    assert stretched(np.array([10, 15, 20, 30]), 10, 20).tolist() == [0, 0.5, 1, 1]
    assert stretched(np.array([7, 7]), 7, 7).tolist() == [0, 0]  # a flat image is black, not a division by zero
    assert inverted(np.array([0.0, 0.25, 1.0])).tolist() == [1.0, 0.75, 0.0]
    assert eight_bit(np.array([-0.1, 0.0, 0.5, 1.0, 1.2])).tolist() == [0, 0, 128, 255, 255]


# ---------------------------------------------------------------- decoding files


@pytest.mark.parametrize(
    ("stored", "dtype", "slope", "intercept"),
    [
        ([h + 1024 for h in HOUNSFIELD], np.uint16, 1, -1024),  # a CT's usual unsigned 12 bits
        ([(h + 1024) // 2 for h in HOUNSFIELD], np.uint16, 2, -1024),  # a slope other than 1
        (HOUNSFIELD, np.int16, 1, 0),  # signed 16 bits, already in Hounsfield units
    ],
)
def test_the_modality_lut_then_the_files_window_give_known_values(tmp_path, stored, dtype, slope, intercept):
    path = write_dicom(tmp_path / "ct.dcm", ct_rows(stored, dtype), bits_stored=12 if dtype == np.uint16 else 16,
                       RescaleSlope=slope, RescaleIntercept=intercept, WindowCenter=40, WindowWidth=400)  # fmt: skip
    assert grey_row(path) == SHOWN_SOFT_TISSUE


def test_a_window_given_replaces_the_files(tmp_path):
    path = write_dicom(tmp_path / "ct.dcm", ct_rows(HOUNSFIELD, np.int16), bits_stored=16,
                       RescaleSlope=1, RescaleIntercept=0, WindowCenter=40, WindowWidth=400)  # fmt: skip
    assert grey_row(path, SOFT_TISSUE) == grey_row(path)  # the file's own window, given: the file's image
    assert grey_row(path, (0, 2001)) == [0, 125, 128, 133, 153, 252]  # a wide window: (x + 0.5) / 2000 + 0.5
    assert decode_image(path, 6, (0, 2001)).tolist() == decode_dicom(path, 6, (0, 2001)).tolist()  # by suffix


def test_a_voi_lut_sequence_is_applied_before_a_window(tmp_path):
    """A VOI LUT from 1000 on: 0, a quarter, half, full of its 16 bits; values below and above take its ends. The
    file's window is ignored: DICOM prefers the LUT."""
    lut = voi_lut(1000, 16, [0, 16383, 32767, 65535])
    path = write_dicom(tmp_path / "lut.dcm", ct_rows([0, 1000, 1001, 1002, 1003, 2000]), bits_stored=12,
                       VOILUTSequence=lut, WindowCenter=40, WindowWidth=400)  # fmt: skip
    assert grey_row(path) == [0, 0, 64, 127, 255, 255]


def test_without_a_window_the_image_spans_its_own_range(tmp_path):
    path = write_dicom(tmp_path / "raw.dcm", ct_rows([100, 100, 150, 200, 300, 300]), bits_stored=12)
    assert grey_row(path) == [0, 0, 64, 128, 255, 255]


def test_monochrome1_is_inverted(tmp_path):
    """MONOCHROME1 shows its lowest values white: the same values, windowed the same, are the other image's
    negative."""
    stored = ct_rows([h + 1024 for h in HOUNSFIELD])
    window = {"RescaleSlope": 1, "RescaleIntercept": -1024, "WindowCenter": 40, "WindowWidth": 400}
    white_low = write_dicom(tmp_path / "m1.dcm", stored, bits_stored=12, photometric="MONOCHROME1", **window)
    assert grey_row(white_low) == [255 - value for value in SHOWN_SOFT_TISSUE]
    minimum_white = write_dicom(tmp_path / "m1-raw.dcm", ct_rows([0, 0, 0, 0, 0, 255]), photometric="MONOCHROME1")
    assert grey_row(minimum_white) == [255, 255, 255, 255, 255, 0]


def test_colour_passes_through(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (6, 6, 3), dtype=np.uint8)
    path = write_dicom(tmp_path / "rgb.dcm", rgb, photometric="RGB")
    assert (decode_dicom(path, 6) == rgb).all()


@pytest.fixture
def only_pylibjpeg_decodes_jpeg_2000(monkeypatch):
    """pydicom's JPEG 2000 decoder with its pylibjpeg plugin alone (Pillow may decode JPEG 2000 as well): the
    compressed file below decodes through pylibjpeg-openjpeg, or not at all."""
    from pydicom.pixels.decoders import JPEG2000LosslessDecoder

    plugins = JPEG2000LosslessDecoder._available
    monkeypatch.setattr(JPEG2000LosslessDecoder, "_available", {"pylibjpeg": plugins["pylibjpeg"]})
    assert JPEG2000LosslessDecoder.available_plugins == ("pylibjpeg",)


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless], ids=["rle-lossless", "jpeg-2000-lossless"])
def test_a_compressed_file_decodes_to_the_same_pixels(tmp_path, syntax, only_pylibjpeg_decodes_jpeg_2000):
    stored = np.random.default_rng(1).integers(0, 4096, (64, 48), dtype=np.uint16)  # 12 bits of noise: no shortcut
    window = {"RescaleSlope": 1, "RescaleIntercept": -1024, "WindowCenter": 40, "WindowWidth": 400}
    plain = write_dicom(tmp_path / "plain.dcm", stored, bits_stored=12, **window)
    packed = write_dicom(tmp_path / "packed.dcm", stored, transfer_syntax=syntax, bits_stored=12, **window)
    import pydicom

    assert pydicom.dcmread(packed).file_meta.TransferSyntaxUID == syntax
    assert packed.stat().st_size != plain.stat().st_size
    assert (decode_dicom(packed, 32) == decode_dicom(plain, 32)).all()


# ---------------------------------------------------------------- refused files, skipped with their reason


def test_multi_frame_and_pixelless_files_are_skipped_with_the_reason(tmp_path):
    from pydicom.uid import BasicTextSRStorage

    root = tmp_path / "scans"
    write_dicom_folder(root, {f"P{i}": ("benign" if i % 2 else "malignant", 1) for i in range(8)})
    write_dicom(root / "benign" / "cine.dcm", np.zeros((30, 8, 8), np.uint16), bits_stored=12, PatientID="P1")
    write_dicom(root / "malignant" / "report.dcm", None, SOPClassUID=BasicTextSRStorage, PatientID="P2")
    index = index_source(root, seed=0)
    refused = ("benign/cine.dcm", "malignant/report.dcm")
    samples = [s for split in SPLITS for s in index.splits[split] if s.key in refused]
    assert len(samples) == 2  # indexed as images, by their suffix: refused when decoded

    reasons = dict(decode_into(np.zeros((2, 8, 8, 3), np.uint8), index, samples, 8))
    assert reasons == {
        "benign/cine.dcm": "multi-frame DICOM (30 frames): export one frame per file",
        "malignant/report.dcm": "DICOM without pixel data (Basic Text SR Storage): only image files can be classified",
    }
    _, cached, skipped = prepare_splits(index, SPLITS, 8, tmp_path / "cache")
    assert tuple(sorted(skipped)) == refused
    assert sum(len(split) for split in cached.values()) == 8  # every single-frame image decoded
    with pytest.raises(CorruptImages) as corrupt:
        cache_split(index, next(split for split in SPLITS if samples[0] in index.splits[split]), 8, tmp_path / "c2")
    assert ("benign/cine.dcm", "multi-frame DICOM (30 frames): export one frame per file") in corrupt.value.failures


# ---------------------------------------------------------------- the split by patient


def test_a_dicom_folder_is_split_by_patient(tmp_path):
    """Twenty patients of two classes, two to four images each, and two images without a PatientID: no patient in
    two splits, every class in every split, the ids in memory, the unnamed counted."""
    patients = {f"P{i:02d}": ("malignant" if i % 2 else "benign", 2 + i % 3) for i in range(20)}
    root = tmp_path / "scans"
    write_dicom_folder(root, patients)
    for n, label in enumerate(("benign", "malignant")):
        write_dicom(root / label / f"anonymous_{n}.dcm", np.full((8, 8), 100 * n, np.uint16), bits_stored=12)
    index = index_source(root, seed=3)

    assert index.split_by == "patients" and index.unidentified == 2
    patients_in = {split: set(index.groups(split)) for split in SPLITS}
    assert not patients_in["train"] & patients_in["val"] and not patients_in["train"] & patients_in["test"]
    assert not patients_in["val"] & patients_in["test"]
    assert set().union(*patients_in.values()) == set(patients)
    for split in SPLITS:
        assert set(index.labels(split)) == {0, 1}
    anonymous = [s for split in SPLITS for s in index.splits[split] if s.key.split("/")[1].startswith("anonymous")]
    assert [s.group for s in anonymous] == [None, None]
    assert patient_of(root / "benign" / "P00_0.dcm") == "P00"
    assert patient_of(root / "benign" / "anonymous_0.dcm") is None
    assert index_source(root, seed=3).splits == index.splits  # seeded: the same split again


def test_the_unnamed_are_counted_in_one_warning_line(tmp_path, capsys):
    from search.study.preflight import unidentified_warning

    root = tmp_path / "scans"
    write_dicom_folder(root, {f"P{i}": ("a" if i % 2 else "b", 1) for i in range(8)})
    write_dicom(root / "a" / "x.dcm", np.zeros((8, 8), np.uint16), bits_stored=12)
    line = unidentified_warning(index_source(root, seed=0))
    assert line.startswith("warning: 1 image(s) of ") and "no PatientID" in line and "\n" not in line


def test_png_folders_split_as_before(tmp_path):
    root = write_image_folder(tmp_path / "images", {"a": 6, "b": 6})
    index = index_source(root, seed=0)
    assert index.split_by == "stratified" and not index.has_groups and index.window is None
    assert index_source(root, seed=0, window=SOFT_TISSUE).window is None  # no DICOM: nothing to window


# ---------------------------------------------------------------- --window: the data's, the study's, the model's


def test_a_window_is_another_cache(tmp_path):
    root = tmp_path / "scans"
    write_dicom_folder(root, {f"P{i}": ("a" if i % 2 else "b", 1) for i in range(8)})
    own, given = index_source(root, seed=0), index_source(root, seed=0, window=(400.0, 2000.0))
    assert given.window == (400.0, 2000.0) and own.window is None
    assert cache_key(own, "train", 16) != cache_key(given, "train", 16)
    assert data.data_digest(own) != data.data_digest(given)
    decoded = [cache_split(index, "train", 16, tmp_path / "cache").images() for index in (own, given)]
    assert not (decoded[0] == decoded[1]).all()


def test_the_study_records_its_window(tmp_path):
    config = study_config(window=SOFT_TISSUE)
    again = StudyConfig.from_yaml(config.to_yaml(), "study.yaml")
    assert again == config and yaml.safe_load(config.to_yaml())["window"] == [40.0, 400.0]
    assert changed_settings(config, replace(config, window=(0.0, 2000.0)), ["window"]) == [
        "window (40.0, 400.0) (now (0.0, 2000.0))"
    ]
    assert "window" in StudyConfig.from_yaml(study_config().to_yaml(), "x").to_yaml()  # null: each file's own
    with pytest.raises(ValueError, match="--window 40,0: the width must be at least 1"):
        study_config(window=(40.0, 0.0))


def test_the_winner_carries_the_window_to_the_retrain():
    from helpers.winners import a_winner

    winner = a_winner(window=SOFT_TISSUE)
    assert winner.to_dict()["window"] == [40.0, 400.0] and "window" not in a_winner().to_dict()
    assert Winner.from_dict(winner.to_dict(), "again").window == SOFT_TISSUE
    with pytest.raises(WinnerRefused, match=r"window must be \[center, width\]"):
        Winner.from_dict({**winner.to_dict(), "window": "40,400"}, "x")


def test_resume_refuses_another_window(tmp_path, monkeypatch, capsys):
    """--resume with another --window than the study's is refused as any changed setting is; the same passes."""
    from helpers.cli import call_main, one_line_refusal
    from mlflow.tracking import MlflowClient

    from search.run import main

    uri, ray = f"sqlite:///{tmp_path}/mlflow.db", tmp_path / "ray"
    config = study_config(
        name="ct", window=SOFT_TISSUE, storage_path=str(ray), optuna_storage=f"sqlite:///{tmp_path}/o.db"
    )
    client = MlflowClient(uri)
    experiment = client.create_experiment("cnn", artifact_location=(tmp_path / "artifacts").as_uri())
    parent = client.create_run(experiment, run_name="ct", tags={"study": "ct", "model": "cnn"}).info.run_id
    client.log_text(parent, config.to_yaml(), "study.yaml")
    client.set_terminated(parent, "KILLED")
    (ray / "ct").mkdir(parents=True)
    (ray / "ct" / "tuner.pkl").write_bytes(b"an interrupted study's trial state")
    resume = ["--model", "cnn", "--name", "ct", "--resume", "--tracking-uri", uri, "--storage-path", str(ray)]
    quiet = {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}

    answer = call_main(main, *resume, "--window", "10,100", cwd=ROOT, monkeypatch=monkeypatch, capsys=capsys, env=quiet)
    assert "ran with other settings: window (40.0, 400.0) (now (10.0, 100.0))" in one_line_refusal(answer, "run.py")
    answer = call_main(main, *resume, "--window", "40,400", cwd=ROOT, monkeypatch=monkeypatch, capsys=capsys, env=quiet)
    assert "other settings" not in one_line_refusal(answer, "run.py")  # refused further on: no Optuna study here


@pytest.mark.parametrize("value", ["40", "40,400,1", "soft,tissue", "40,0.5", "nan,400"])
def test_a_malformed_window_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys, value):
    from helpers.cli import call_main

    from search.run import main

    answer = call_main(  # the environment put back: run.py sets Ray's, which a later ray.init would inherit
        main, "--model", "cnn", "--data", "synthetic", f"--window={value}", cwd=tmp_path, monkeypatch=monkeypatch,
        capsys=capsys,
    )  # fmt: skip
    assert answer.code == 2
    err = answer.err.strip()
    assert err.startswith(f"search/run.py: error: --window {value}: ") and "\n" not in err, err
    assert list(tmp_path.iterdir()) == []  # nothing written: no store, no cache


def test_a_window_on_a_source_without_dicom_is_refused(tmp_path, monkeypatch, capsys):
    from helpers.cli import call_main

    from search.run import main

    flags = ("--model", "cnn", "--data", "synthetic:3", "--window", "40,400", "--gpus-per-trial", "0")
    answer = call_main(main, *flags, cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert answer.code == 2
    assert "--window 40,400 windows DICOM images (.dcm, .dicom) and synthetic:3 holds none" in answer.err


def test_model_files_keep_the_window_and_older_ones_load(tmp_path, dicom_model):
    windowed = ModelFile.load(dicom_model)
    assert windowed.window == SOFT_TISSUE
    assert ModelFile.load(replace(windowed, window=None).save(tmp_path / "old.pt")).window is None
    assert "window" not in torch.load(tmp_path / "old.pt", weights_only=True)  # written as before


# ---------------------------------------------------------------- predict.py on .dcm images


@pytest.fixture(scope="module")
def dicom_model(tmp_path_factory) -> Path:
    """A 32 px ViT (random weights) whose model file says its images were windowed 40/400."""
    torch.manual_seed(0)
    spec = ModelSpec("vit", 2, 32, pretrained=False)
    folder = tmp_path_factory.mktemp("final")
    model_file = ModelFile(build_model(spec).state_dict(), spec, Hyperparameters(), ["a", "b"], {}, window=SOFT_TISSUE)
    return model_file.save(folder / "model.pt")


def predicted(model: Path, images: Path, out: Path, *flags: str) -> tuple[int, str, dict[str, list[float]]]:
    from search.predict import main

    stdout, stderr = io.StringIO(), io.StringIO()
    with redirect_stdout(stdout), redirect_stderr(stderr):
        code = main(["--device", "cpu", "--model", str(model), "--images", str(images), "--out", str(out), *flags])
    rows = {}
    if out.exists():
        with out.open(newline="") as stream:
            for row in csv.DictReader(stream):  # the probability of each class, in the model's order
                rows[row["image"]] = [float(value) for column, value in row.items() if column.startswith("p:")]
    return code, stdout.getvalue() + stderr.getvalue(), rows


def expected(model_path: Path, files: list[Path], window: tuple[float, float] | None) -> np.ndarray:
    saved = ModelFile.load(model_path)
    network = build_model(replace(saved.spec, pretrained=False))
    network.load_state_dict(saved.weights)
    pixels = np.stack([decode_image(path, 32, window) for path in files])
    with torch.no_grad():
        logits = network.eval()(torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255)
    return torch.softmax(logits / saved.temperature, dim=1).numpy()


def test_predict_decodes_dicom_with_the_models_window_or_the_one_given(tmp_path, dicom_model):
    images = tmp_path / "new"
    written = write_dicom_folder(images, {"Q1": ("a", 2), "Q2": ("b", 2)})
    write_dicom(images / "b" / "cine.dcm", np.zeros((3, 8, 8), np.uint16), bits_stored=12)
    files = sorted(path for paths in written.values() for path in paths)
    keys = [path.relative_to(images).as_posix() for path in files]

    code, output, rows = predicted(dicom_model, images, tmp_path / "model-window.csv")
    assert code == 0, output
    assert "Window:   DICOM images at center 40, width 400" in output
    assert sorted(rows) == keys  # the multi-frame file skipped
    np.testing.assert_allclose([rows[key] for key in keys], expected(dicom_model, files, SOFT_TISSUE), atol=1e-4)
    skipped = (tmp_path / "model-window_skipped.txt").read_text()
    assert "b/cine.dcm" in skipped and "multi-frame DICOM (3 frames): export one frame per file" in skipped

    code, output, given = predicted(dicom_model, images, tmp_path / "given.csv", "--window=-500,3000")
    assert code == 0, output
    np.testing.assert_allclose([given[key] for key in keys], expected(dicom_model, files, (-500, 3000)), atol=1e-4)
    assert not np.allclose([given[key] for key in keys], [rows[key] for key in keys], atol=1e-4)

    code, output, _ = predicted(dicom_model, images, tmp_path / "bad.csv", "--window", "40")
    assert code == 2 and "--window 40: write CENTER,WIDTH" in output and not (tmp_path / "bad.csv").exists()


# ---------------------------------------------------------------- a study on a DICOM folder, as a user runs it


@pytest.mark.slow
def test_a_study_final_and_predict_on_a_dicom_folder(tmp_path):
    """run.py --window on a DICOM folder (split by patient), final.py retrains with the study's window, model.pt
    keeps it, predict.py decodes new .dcm files with it."""
    root = tmp_path / "project"
    (root / "spaces").mkdir(parents=True)
    for space in (ROOT / "spaces").glob("*.yaml"):
        (root / "spaces" / space.name).write_text(space.read_text())
    patients = {f"P{i:02d}": ("malignant" if i % 2 else "benign", 3) for i in range(16)}
    write_dicom_folder(root / "scans", patients)
    searched = run_script(
        "run.py", "--model", "vit", "--smoke", "--data", "scans", "--window", "40,400", "--trials", "1",
        "--epochs", "1", "--no-pretrained", "--gpus-per-trial", "0", "--name", "dicom", cwd=root, timeout=600,
    )  # fmt: skip
    assert searched.returncode == 0, searched.stdout[-3000:] + searched.stderr[-3000:]
    study = yaml.safe_load((root / "ray_results" / "dicom" / "study.yaml").read_text())
    assert study["window"] == [40.0, 400.0]
    assert ModelFile.load(next((root / "ray_results" / "dicom").rglob("best_model.pt"))).window == SOFT_TISSUE

    final = run_script("final.py", "--study", "dicom", "--out", "final", "--no-pretrained", cwd=root, timeout=600)
    assert final.returncode == 0, final.stdout[-3000:] + final.stderr[-3000:]
    assert ModelFile.load(root / "final" / "model.pt").window == SOFT_TISSUE
    assert yaml.safe_load((root / "final" / "config.yaml").read_text())["window"] == [40.0, 400.0]

    new = write_dicom_folder(tmp_path / "new", {"N1": ("benign", 2)})
    code, output, rows = predicted(root / "final" / "model.pt", tmp_path / "new", tmp_path / "p.csv")
    assert code == 0 and len(rows) == len(new["N1"]) and "center 40, width 400" in output, output
