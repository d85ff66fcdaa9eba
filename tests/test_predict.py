"""predict.py: calibrated predictions on a folder of new images, skipped files, saliency overlays, bad input.

Tiny real model files (a 32 px ViT and a 64 px CNN, random weights, temperature 2)
stand in for final.py's model.pt; the slow test registers one in a SQLite store
under tmp_path and predicts through models:/NAME/VERSION.
"""

from __future__ import annotations

import csv
import io
import os
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlparse

import numpy as np
import pytest
import torch
from helpers import mounted_tmpfs, run_script, write_image_folder
from helpers.cuda import requires_cuda

from search.inference.model_source import model_source
from search.predict import main
from search.tracking.registered import RegisteredModel
from search.tracking.schema import MODEL_FILE_IN_MODEL
from trainables.checkpoint import ModelFile, save_trial_checkpoint
from trainables.config import Hyperparameters
from trainables.data import decode_image
from trainables.models import build_model
from trainables.spec import ModelSpec

CLASSES = ["benign", "malignant", "normal"]
TEMPERATURE = 2.0
SIZES = {"vit": 32, "cnn": 64}
"""The CNN's last convolution is 1/32 of the input: 64 px gives a 2x2 heat map, 32 px a flat 1x1 one."""
READABLE = 6


@pytest.fixture(scope="module")
def model_files(tmp_path_factory) -> dict[str, Path]:
    """final/<name>/model.pt per model, as final.py lays it out."""
    root = tmp_path_factory.mktemp("final")
    files = {}
    for name, size in SIZES.items():
        torch.manual_seed(0)
        spec = ModelSpec(name, len(CLASSES), size, pretrained=False)
        model = build_model(spec)
        folder = root / name
        folder.mkdir()
        ModelFile(model.state_dict(), spec, Hyperparameters(), CLASSES, {}, temperature=TEMPERATURE).save(
            folder / "model.pt"
        )
        files[name] = folder / "model.pt"
    return files


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Six PNGs in class folders, a corrupt .png and a text file."""
    root = write_image_folder(tmp_path_factory.mktemp("new") / "images", {"a": 2, "b": 2, "c": 2})
    (root / "a" / "broken.png").write_bytes(b"not a png at all")
    (root / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on a small machine shared with other work, two threads on a busy core wait on each
    other, and these tiny models run ten times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def explained(model_files, images, tmp_path_factory) -> dict[str, SimpleNamespace]:
    """predict.py --explain per model, run once: its folder, exit code and output."""
    runs = {}
    for name in SIZES:
        folder = tmp_path_factory.mktemp(f"predicted-{name}")
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            code = predict("--model", str(model_files[name]), "--images", str(images),
                           "--out", str(folder / "predictions.csv"), "--explain")  # fmt: skip
        runs[name] = SimpleNamespace(folder=folder, code=code, stdout=out.getvalue(), stderr=err.getvalue())
    return runs


def predict(*args: str) -> int:
    return main(["--device", "cpu", *args])


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as stream:
        reader = csv.DictReader(stream)
        return list(reader.fieldnames or []), list(reader)


def probabilities_of(rows: list[dict[str, str]]) -> np.ndarray:
    return np.array([[float(row[f"p:{name}"]) for name in CLASSES] for row in rows])


def expected_probabilities(model_file: Path, files: list[Path], temperature: float | None = None) -> np.ndarray:
    """softmax(model(x) / T), computed here from the model file and the training decoder."""
    saved = ModelFile.load(model_file)
    network = build_model(replace(saved.spec, pretrained=False))
    network.load_state_dict(saved.weights)
    pixels = np.stack([decode_image(path, saved.spec.img_size) for path in files])
    batch = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        logits = network.eval()(batch)
    return torch.softmax(logits / (temperature or saved.temperature), dim=1).numpy()


def assert_one_line_error(capsys, *words: str) -> None:
    err = capsys.readouterr().err.strip()
    assert err.startswith("search/predict.py: error: ") and "\n" not in err, err
    for word in words:
        assert word in err, err


# ---------------------------------------------------------------- predictions


@pytest.mark.parametrize("name", list(SIZES))
def test_a_row_per_readable_image_with_calibrated_probabilities(name, explained, model_files, images):
    run = explained[name]
    assert run.code == 0, run.stderr
    columns, rows = read_csv(run.folder / "predictions.csv")
    assert columns == ["image", "prediction", "probability", *(f"p:{name}" for name in CLASSES)]
    assert [row["image"] for row in rows] == sorted(f"{c}/{i:03d}.png" for c in "abc" for i in range(2))
    probabilities = probabilities_of(rows)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1, atol=1e-5)
    expected = expected_probabilities(model_files[name], [images / row["image"] for row in rows])
    np.testing.assert_allclose(probabilities, expected, rtol=1e-5, atol=2e-6)
    for row, p in zip(rows, probabilities, strict=True):
        assert row["prediction"] == CLASSES[int(p.argmax())]
        assert float(row["probability"]) == p.max()
    assert all(row[key] == f"{float(row[key]):.6g}" for row in rows for key in columns[2:])  # 6 significant digits
    assert not (run.folder / "predictions.csv.partial").exists()


def test_the_temperature_softens_the_probabilities_and_keeps_their_order(explained, model_files, images):
    rows = read_csv(explained["vit"].folder / "predictions.csv")[1]
    calibrated = probabilities_of(rows)
    raw = expected_probabilities(model_files["vit"], [images / row["image"] for row in rows], temperature=1.0)
    assert (calibrated.max(axis=1) < raw.max(axis=1)).all()
    assert (calibrated.argmax(axis=1) == raw.argmax(axis=1)).all()


def test_unreadable_images_are_skipped_listed_and_other_files_ignored(explained):
    run = explained["vit"]
    warning = "warning: 1 of 7 images could not be read and were skipped (a/broken.png): see "
    assert run.stderr.startswith(warning) and run.stderr.count("\n") == 1, run.stderr
    assert "7 in " in run.stdout and "(1 file(s) that are not images ignored)" in run.stdout
    skipped = (run.folder / "predictions_skipped.txt").read_text().splitlines()
    assert len(skipped) == 1 and skipped[0].startswith("a/broken.png\tUnidentifiedImageError")


def test_a_folder_holding_model_pt_and_one_image_file_without_explain(explained, model_files, images, tmp_path):
    """The plain prediction pass gives the very row the explained run gave (which predicts in the CAM's pass)."""
    out = tmp_path / "one.csv"
    one = images / "b" / "001.png"
    assert predict("--model", str(model_files["vit"].parent), "--images", str(one), "--out", str(out)) == 0
    rows = read_csv(out)[1]
    explained_rows = read_csv(explained["vit"].folder / "predictions.csv")[1]
    assert rows == [{**row, "image": "001.png"} for row in explained_rows if row["image"] == "b/001.png"]
    assert not (tmp_path / "one_skipped.txt").exists()


# ---------------------------------------------------------------- saliency


@pytest.mark.parametrize("name", list(SIZES))
def test_explain_writes_an_overlay_per_readable_image(name, explained):
    folder = explained[name].folder / "predictions_saliency"
    overlays = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))
    assert overlays == sorted(["a", "b", "c", *(f"{c}/{i:03d}.png.png" for c in "abc" for i in range(2))])
    from PIL import Image

    with Image.open(folder / "a" / "000.png.png") as picture:
        assert picture.mode == "RGB" and picture.width >= 224 and picture.height > picture.width  # a title band


def test_overlays_inside_the_images_folder_are_not_predicted_on_next_time(model_files, tmp_path):
    images = write_image_folder(tmp_path / "images", {"a": 2})
    out = images / "predictions.csv"
    for _ in range(2):
        assert predict("--model", str(model_files["vit"]), "--images", str(images), "--out", str(out), "--explain") == 0
        assert [row["image"] for row in read_csv(out)[1]] == ["a/000.png", "a/001.png"]
    assert (images / "predictions_saliency" / "a" / "001.png.png").is_file()


@pytest.mark.parametrize("name", list(SIZES))
def test_heat_maps_explain_the_predicted_class_and_are_not_flat(name, model_files, images):
    from search.inference.predictor import calibrated_probabilities, load_model
    from search.inference.saliency import cam_layer, explain

    model = load_model(model_files[name], torch.device("cpu"), name)
    pixels = np.stack([decode_image(images / c / "000.png", model.spec.img_size) for c in "abc"])
    with torch.no_grad():
        expected_logits = model.network(torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255)
    logits, maps = explain(model, pixels)
    torch.testing.assert_close(logits, expected_logits)  # the CAM's pass predicts as a plain one does
    assert maps.shape == (3, model.spec.img_size, model.spec.img_size)
    assert maps.min() >= 0 and maps.max() <= 1 + 1e-6
    assert max(float(m.std()) for m in maps) > 0.05  # some image's map points somewhere
    assert cam_layer(model).grid == (2, 2)  # 32 px / 16 px patches; 64 px / 32 (the CNN's reduction)
    # The map explains the predicted class: asked for that class, the same map; for another, another.
    predicted = calibrated_probabilities(model, pixels).argmax(axis=1)
    np.testing.assert_array_equal(explain(model, pixels, predicted)[1], maps)
    assert not np.allclose(explain(model, pixels, (predicted + 1) % len(CLASSES))[1], maps)


# ---------------------------------------------------------------- bad input


def test_argument_errors_are_one_line_exit_2_before_anything_loads(tmp_path):
    """The script itself: every problem at once, no traceback, fast (standard library only)."""
    result = run_script(
        "predict.py",
        "--model", "missing.pt", "--images", "nowhere", "--out", "results.txt", "--batch-size", "0",
        cwd=tmp_path, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for problem in ("--model missing.pt", "--images nowhere", "--out results.txt", "--batch-size 0"):
        assert problem in lines[0]
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "case, words",
    [
        ("missing images folder", ["--images", "no such folder"]),
        ("no images", ["no images there", "only 1 file(s) of other kinds"]),
        ("unknown model path", ["--model", "no such file or folder"]),
        ("not a model file", ["is not a model file"]),
        ("folder without a model", ["holds no model.pt or best_model.pt"]),
        ("malformed models uri", ["models:/NAME/VERSION"]),
        ("runs uri", ["models:/NAME/VERSION"]),
        ("missing store", ["no MLflow store at"]),
        ("out is a folder", ["is a folder"]),
        ("out not csv", ["name a .csv file"]),
        ("out parent missing", ["does not exist"]),
    ],
)
def test_bad_input_is_one_line_exit_2_and_nothing_written(case, words, model_files, images, tmp_path, capsys):
    text_only = tmp_path / "texts"
    text_only.mkdir()
    (text_only / "readme.txt").write_text("x")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00" * 100)
    args = {"--model": str(model_files["vit"]), "--images": str(images), "--out": str(tmp_path / "p.csv")}
    args.update(
        {
            "missing images folder": {"--images": str(tmp_path / "nowhere")},
            "no images": {"--images": str(text_only)},
            "unknown model path": {"--model": str(tmp_path / "final" / "model.pt")},
            "not a model file": {"--model": str(junk)},
            "folder without a model": {"--model": str(text_only)},
            "malformed models uri": {"--model": "models:/cnn-classifier/three"},
            "runs uri": {"--model": "runs:/abc/model"},
            "missing store": {"--model": "models:/cnn-classifier/1", "--tracking-uri": f"sqlite:///{tmp_path}/x.db"},
            "out is a folder": {"--out": str(text_only)},
            "out not csv": {"--out": str(tmp_path / "p.txt")},
            "out parent missing": {"--out": str(tmp_path / "no" / "p.csv")},
        }[case]
    )
    before = sorted(tmp_path.rglob("*"))
    assert predict(*(item for pair in args.items() for item in pair)) == 2
    assert_one_line_error(capsys, *words)
    assert sorted(tmp_path.rglob("*")) == before  # no CSV, no skipped list, no store created


def test_a_folder_of_unreadable_images_is_one_line_exit_2(model_files, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "x.png").write_bytes(b"nope")
    out = tmp_path / "p.csv"
    assert predict("--model", str(model_files["vit"]), "--images", str(broken), "--out", str(out)) == 2
    assert_one_line_error(capsys, "none of the 1 images could be read", "p_skipped.txt")
    assert not out.exists() and (tmp_path / "p_skipped.txt").exists()


def trial_checkpoint(path: Path) -> None:
    """A trial's checkpoint.pt, as save_trial_checkpoint writes it (training state, spec, no classes)."""
    from trainables.engine import Learner

    spec = ModelSpec("vit", len(CLASSES), SIZES["vit"], pretrained=False, vit_depth=1)
    learner = Learner(build_model(spec), Hyperparameters(), torch.device("cpu"), "val_acc", 0)
    save_trial_checkpoint(path.parent, learner, spec, Hyperparameters(), {"val_acc": 0.5})


NOT_MODEL_FILES = {
    "random bytes": (lambda p: p.write_bytes(np.random.default_rng(0).bytes(4096)), "not a zip archive"),
    "text file": (lambda p: p.write_text("epochs: 3\nlr: 0.001\n"), "a text file"),
    "empty file": (lambda p: p.write_bytes(b""), "an empty file"),
    "state dict": (
        lambda p: torch.save(build_model(ModelSpec("vit", 3, 32, pretrained=False, vit_depth=1)).state_dict(), p),
        "a plain state dict",
    ),
    "trial checkpoint": (trial_checkpoint, "a trial's checkpoint, not the study's best_model.pt"),
}


@pytest.mark.parametrize("case", NOT_MODEL_FILES)
def test_a_file_that_is_no_model_file_is_one_line_of_our_own_exit_2(case, images, tmp_path, capsys):
    """Never torch's advice to load it with weights_only=False (which would run its pickled code)."""
    write, cause = NOT_MODEL_FILES[case]
    model = tmp_path / "checkpoint.pt"
    write(model)
    assert predict("--model", str(model), "--images", str(images), "--out", str(tmp_path / "p.csv")) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "weights_only" not in err, err
    assert err.startswith(
        f"search/predict.py: error: --model {model} is not a model file written by search/final.py or a study ({cause}"
    ), err
    assert err.endswith("): give final.py's model.pt (or its results folder) or a study's best_model.pt"), err
    assert not (tmp_path / "p.csv").exists()


def test_out_in_a_folder_that_cannot_be_written_is_one_line_exit_2_before_predicting(
    model_files, images, tmp_path, capsys
):
    """A real read-only mount: permission bits would say yes to root."""
    with mounted_tmpfs(tmp_path / "ro", read_only=True) as folder:
        out = folder / "p.csv"
        assert predict("--model", str(model_files["vit"]), "--images", str(images), "--out", str(out)) == 2
        assert_one_line_error(capsys, f"--out {out}: its folder {folder} cannot be written (Read-only file system)")
        assert not list(folder.iterdir())


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes a folder whatever its permission bits")
def test_out_in_a_folder_without_write_permission_is_one_line_exit_2(model_files, images, tmp_path, capsys):
    folder = tmp_path / "locked"
    folder.mkdir(mode=0o555)
    try:
        out = folder / "p.csv"
        assert predict("--model", str(model_files["vit"]), "--images", str(images), "--out", str(out)) == 2
        assert_one_line_error(capsys, f"--out {out}: its folder {folder} cannot be written (Permission denied)")
    finally:
        folder.chmod(0o755)


def test_an_out_that_exists_and_is_no_file_is_refused(model_files, images, tmp_path, capsys):
    out = tmp_path / "p.csv"
    os.mkfifo(out)
    assert predict("--model", str(model_files["vit"]), "--images", str(images), "--out", str(out)) == 2
    assert_one_line_error(capsys, f"--out {out} exists and is not a file")


def test_an_out_of_another_user_in_a_sticky_folder_is_refused(model_files, images, tmp_path, monkeypatch, capsys):
    """/tmp's rule: only the owner of a file (or of the folder) may rename over it. Seen as another user."""
    sticky = tmp_path / "shared"
    sticky.mkdir()
    sticky.chmod(0o1777)
    out = sticky / "p.csv"
    out.write_text("someone else's predictions\n")
    monkeypatch.setattr(os, "geteuid", lambda: os.stat(out).st_uid + 4242)
    assert predict("--model", str(model_files["vit"]), "--images", str(images), "--out", str(out)) == 2
    assert_one_line_error(capsys, f"--out {out} exists and belongs to another user in a sticky folder")
    assert out.read_text() == "someone else's predictions\n"


def test_removing_a_partial_csv_never_raises_a_second_error(tmp_path):
    """The cleanup after a failure: on a read-only mount, unlink of a file that is not there fails too."""
    from search.inference.pipeline import discard

    with mounted_tmpfs(tmp_path / "ro", read_only=True) as folder:
        partial = folder / "p.csv.partial"
        with pytest.raises(OSError, match="Read-only file system"):
            partial.unlink(missing_ok=True)  # what the cleanup did, raising over the error that stopped the run
        discard(partial)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_cuda_without_a_gpu_is_one_line_exit_2(model_files, images, tmp_path, capsys):
    assert main(["--model", str(model_files["vit"]), "--images", str(images), "--device", "cuda",
                 "--out", str(tmp_path / "p.csv")]) == 2  # fmt: skip
    assert_one_line_error(capsys, "--device cuda: no CUDA GPU is visible")


def test_models_uris_parse_to_a_name_and_a_version_or_alias(tmp_path):
    assert model_source("models:/cnn-classifier/3") == RegisteredModel("cnn-classifier", "3")
    assert model_source("models:/cnn-classifier/latest") == RegisteredModel("cnn-classifier", "latest")
    assert model_source("models:/cnn-classifier@champion") == RegisteredModel("cnn-classifier", alias="champion")
    assert str(RegisteredModel("cnn-classifier", alias="champion")) == "models:/cnn-classifier@champion"
    for bad in ("models:/cnn-classifier", "models:/a/b/c", "models:/a@", "models:/"):
        with pytest.raises(ValueError, match="models:/NAME/VERSION"):
            model_source(bad)


def test_a_models_uri_that_does_not_exist_names_what_the_registry_holds(model_files, images, tmp_path, capsys):
    from search.tracking.store import mlflow_client

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow_client(uri).create_registered_model("cnn-classifier")
    capsys.readouterr()  # MLflow's lines about creating the store
    common = ["--images", str(images), "--tracking-uri", uri, "--out", str(tmp_path / "p.csv")]
    assert predict("--model", "models:/vit-classifier/1", *common) == 2
    assert_one_line_error(capsys, "no registered model 'vit-classifier'", "registered: cnn-classifier")
    assert predict("--model", "models:/cnn-classifier/1", *common) == 2
    assert_one_line_error(capsys, "cnn-classifier has no versions")
    assert predict("--model", "models:/cnn-classifier@champion", *common) == 2
    assert_one_line_error(capsys, "has no alias 'champion'")


# ---------------------------------------------------------------- a registered version


@pytest.mark.slow
def test_a_registered_version_predicts_as_its_model_file_does(model_files, images, tmp_path, capsys):
    """log_model (what final.py calls) registers the tiny ViT; models:/NAME/1 and @alias predict with it,
    and a version registered without model.pt (as before final.py stored it) is one line, exit 2."""
    from search.final_model.registry import log_model
    from search.tracking.store import mlflow_client

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = mlflow_client(uri)
    experiment = client.create_experiment("vit", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id
    register = dict(model_file=model_files["vit"], tracking_uri=uri, run_id=run_id)
    assert log_model(**register, register_name="vit-classifier").version == 1
    client.set_registered_model_alias("vit-classifier", "champion", "1")
    older = log_model(**register, register_name="vit-classifier")
    assert older.version == 2  # made a version from before final.py stored model.pt: its file taken away
    folder = client.get_logged_model(older.model_id).artifact_location
    (Path(urlparse(folder).path) / MODEL_FILE_IN_MODEL).unlink()

    local = tmp_path / "local.csv"
    assert predict("--model", str(model_files["vit"]), "--images", str(images), "--out", str(local)) == 0
    for reference in ("models:/vit-classifier/1", "models:/vit-classifier@champion"):
        out = tmp_path / "registered.csv"
        assert predict("--model", reference, "--tracking-uri", uri, "--images", str(images), "--out", str(out)) == 0
        assert out.read_text() == local.read_text()
    capsys.readouterr()
    assert predict("--model", "models:/vit-classifier/latest", "--tracking-uri", uri, "--images", str(images),
                   "--out", str(tmp_path / "old.csv")) == 2  # fmt: skip
    assert_one_line_error(capsys, "models:/vit-classifier/latest (version 2) holds no extra_files/model.pt")


# ---------------------------------------------------------------- CUDA


@requires_cuda
@pytest.mark.parametrize("name", ["vit", "cnn"])
def test_cuda_predicts_and_explains_as_the_cpu_does(name, model_files, images, tmp_path):
    from search.inference.predictor import calibrated, calibrated_probabilities, load_model
    from search.inference.saliency import explain

    pixels = np.stack([decode_image(images / c / "000.png", SIZES[name]) for c in "abc"])
    results = {}
    for device in ("cpu", "cuda"):
        model = load_model(model_files[name], torch.device(device), name)
        logits, maps = explain(model, pixels)
        results[device] = calibrated_probabilities(model, pixels), maps
        np.testing.assert_allclose(calibrated(logits, model.temperature), results[device][0], atol=1e-6)
    np.testing.assert_allclose(results["cuda"][0], results["cpu"][0], atol=1e-4)
    np.testing.assert_allclose(results["cuda"][1], results["cpu"][1], atol=2e-2)
    out = tmp_path / "p.csv"
    assert main(["--model", str(model_files[name]), "--images", str(images), "--out", str(out), "--device", "cuda",
                 "--explain"]) == 0  # fmt: skip
    assert len(list((tmp_path / "p_saliency").rglob("*.png"))) == READABLE
