"""final.py --export onnx: model.onnx computes what PyTorch computes, at any batch size; refusals come first.

The exports build this project's models (trainables.models.build_model) at 32 pixels
without pretrained weights. A one-block vit exports in seconds and runs by default; the
cnn and hybrid carry the whole tf_efficientnetv2_s (about 30 s each on two cores) and
are marked slow.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import numpy as np
import pytest

from search.final_model import export
from search.final_model.export import INPUT_NAME, INSTALL, ONNX_FILE, ExportMismatch, agreement, export_onnx

CLASSES, SIZE, TEMPERATURE = 4, 32, 1.7


def scoring(name: str):
    import torch

    from trainables.models import build_model
    from trainables.scoring import ScoringNetwork
    from trainables.spec import ModelSpec

    torch.manual_seed(0)
    model = build_model(ModelSpec(name, CLASSES, SIZE, pretrained=False, vit_depth=1))
    return ScoringNetwork([model], [TEMPERATURE])


def cached_images(count: int, seed: int = 0) -> np.ndarray:
    """Cached-split images: uint8 (N, H, W, 3)."""
    return np.random.default_rng(seed).integers(0, 256, (count, SIZE, SIZE, 3), dtype=np.uint8)


def exported_matches_pytorch(name: str, tmp_path) -> None:
    import onnxruntime
    import torch

    model = scoring(name)
    start = time.perf_counter()
    check = export_onnx(model, cached_images(6), tmp_path / ONNX_FILE)
    print(f"\n{name}: export and check {time.perf_counter() - start:.1f} s, {check.line()}")
    assert check.share <= 1 and check.images == check.of == 6
    assert [p.name for p in tmp_path.iterdir()] == [ONNX_FILE]  # the weights inside, no model.onnx.data beside

    session = onnxruntime.InferenceSession(str(tmp_path / ONNX_FILE), providers=["CPUExecutionProvider"])
    (shape,) = [tuple(i.shape) for i in session.get_inputs()]
    assert isinstance(shape[0], str) and shape[1:] == (3, SIZE, SIZE)  # a named, dynamic batch dimension
    for batch in (1, 3, 5):  # the example had 2
        images = export.model_input(cached_images(batch, seed=batch))
        (probabilities,) = session.run(None, {INPUT_NAME: images})
        with torch.no_grad():
            expected = model(torch.from_numpy(images)).numpy()
        assert probabilities.shape == (batch, CLASSES)
        assert np.allclose(probabilities.sum(axis=1), 1, atol=1e-5)
        assert agreement(probabilities, expected)[1] <= 1


def test_a_vit_exports_to_onnx_that_matches_pytorch_at_any_batch_size(tmp_path):
    exported_matches_pytorch("vit", tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["cnn", "hybrid"])
def test_the_cnn_and_the_hybrid_export_to_onnx_that_matches_pytorch(tmp_path, name):
    exported_matches_pytorch(name, tmp_path)


def test_an_export_that_differs_from_pytorch_fails_and_leaves_no_file(tmp_path, monkeypatch):
    from torch import nn

    from trainables.scoring import ScoringNetwork

    tiny = ScoringNetwork([nn.Sequential(nn.Flatten(), nn.Linear(3 * SIZE * SIZE, CLASSES))], [TEMPERATURE])  # fast
    nan = np.full((2, CLASSES), np.nan)
    monkeypatch.setattr(export, "both_probabilities", lambda *args: (nan, nan))
    with pytest.raises(ExportMismatch, match="differs from the PyTorch model by up to nan"):
        export_onnx(tiny, cached_images(2), tmp_path / ONNX_FILE)
    assert not (tmp_path / ONNX_FILE).exists()


def test_the_tolerance_passes_float32_disagreement_and_fails_real_faults():
    """Relative to each probability, as float32's rounding reaches it through the softmax, with a floor near 0.
    What issue 23's retrain showed (1.05e-04 at a probability near 0.5) uses a small share of it; a
    temperature 5 % off, or every probability 2 % off, fails."""
    expected = np.array([[0.5, 0.3, 0.19, 0.01], [0.9999, 1e-4, 1e-30, 0.0]])
    assert agreement(expected, expected) == (0.0, 0.0)
    issue_23 = expected[:1] * (1 + 2.1e-4)
    assert agreement(issue_23, expected[:1]) == pytest.approx((1.05e-4, 0.021), rel=0.01)
    assert agreement(expected * 1.02, expected)[1] > 1
    logits = np.array([[2.0, 1.0, -0.5, -3.0]])
    right, warm = (np.exp(logits / t) / np.exp(logits / t).sum() for t in (1.0, 1.05))
    assert agreement(warm, right)[1] > 1
    assert np.isnan(agreement(expected * np.nan, expected)[1])


def test_missing_packages_are_one_line_exit_2_before_anything_loads(monkeypatch, capsys, tmp_path):
    from search.final import main

    found = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else found(name, *a))
    config = tmp_path / "missing.yaml"  # never read: the packages are checked first
    assert main(["--config", str(config), "--export", "onnx"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == f"search/final.py: error: --export onnx needs onnxscript, not installed: {INSTALL}"


def test_an_unknown_export_format_is_refused_by_the_parser(capsys):
    from search.final import build_parser

    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["--study", "s", "--export", "tflite"])
    assert exit_.value.code == 2 and "invalid choice: 'tflite' (choose from 'onnx')" in capsys.readouterr().err


# ---------------------------------------------------------------- a failed export keeps the retrain


def tiny_config(tmp_path) -> str:
    """A best_config.yaml for a one-block vit on the smoke subsample of synthetic:3, one epoch."""
    import yaml

    config = {
        "model": "vit",
        "hyperparameters": {"vit_depth": 1, "batch_size": 8},
        "classes": [f"class_{c:02d}" for c in range(3)],
        "data": "synthetic:3",
        "seed": 0,
        "img_size": SIZE,
        "smoke": True,
        "pretrained": False,
        "best_epoch": 1,
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def stub_export(module, images, path, *args):
    path.write_bytes(b"an ONNX file")  # the exporter's minute is not what this test is about


def test_a_failed_export_leaves_out_model_onnx_and_keeps_the_registered_retrain(tmp_path, monkeypatch, capsys):
    """A retrain whose model.onnx fails the check: registered, results and card written, no model.onnx anywhere,
    a warning line, the run tagged, exit status 1."""
    from mlflow.tracking import MlflowClient

    from search.final import main

    monkeypatch.setattr(export, "write_onnx", stub_export)
    probabilities = np.full((8, 3), 1 / 3)
    monkeypatch.setattr(export, "both_probabilities", lambda *args: (probabilities * 0.9, probabilities))
    uri, out = f"sqlite:///{tmp_path}/mlflow.db", tmp_path / "out"
    start = time.perf_counter()
    flags = ["--no-pretrained", "--export", "onnx", "--out", str(out), "--cache-dir", str(tmp_path / "cache")]
    code = main(["--config", tiny_config(tmp_path), "--tracking-uri", uri, *flags])
    printed = capsys.readouterr().out
    print(f"\ntiny retrain with a failed export: {time.perf_counter() - start:.1f} s")
    assert code == 1  # the export failed, and says so
    (warning,) = [line for line in printed.splitlines() if line.startswith("warning: --export onnx failed")]
    assert "model.onnx left out: the exported model.onnx differs from the PyTorch model by up to 3.33e-02" in warning
    assert "ONNX:       not written: the export failed" in printed and str(out / ONNX_FILE) not in printed
    assert not (out / ONNX_FILE).exists() and (out / "model.pt").exists() and (out / "model_card.md").exists()

    client = MlflowClient(uri)
    (version,) = client.search_model_versions("name = 'vit-classifier'")
    run = client.get_run(version.run_id)
    assert run.info.status == "FINISHED" and "test_acc" in run.data.metrics
    assert "differs from the PyTorch model" in run.data.tags["export_failed"]
    assert ONNX_FILE not in {artifact.path for artifact in client.list_artifacts(run.info.run_id)}


class RecordingClient:
    """The two calls export_model makes on MLflow, recorded."""

    def __init__(self):
        self.artifacts, self.tags = [], {}

    def log_artifact(self, run_id, path):
        self.artifacts.append(Path(path).name)

    def set_tag(self, run_id, key, value):
        self.tags[key] = value


def test_an_exporter_that_crashes_leaves_no_file_and_a_one_line_warning(tmp_path, monkeypatch, capsys):
    from types import SimpleNamespace

    from search.final_model.retrain import EXPORT_FAILED_TAG, export_model
    from trainables.checkpoint import ModelFile
    from trainables.config import Hyperparameters
    from trainables.spec import ModelSpec

    def crash(module, images, path, *args):
        path.write_bytes(b"half an ONNX file")  # what an exporter that dies mid-write leaves
        raise RuntimeError("Failed to convert 'aten::frobnicate'\nand a long story on the next lines")

    monkeypatch.setattr(export, "write_onnx", crash)
    final = SimpleNamespace(export="onnx", out=tmp_path, test=SimpleNamespace(images=lambda: cached_images(2)))
    client = RecordingClient()
    spec = ModelSpec("vit", CLASSES, SIZE, pretrained=False, vit_depth=1)
    weights = scoring("vit").networks[0].state_dict()
    ModelFile(weights, spec, Hyperparameters(), list("abcd"), {}, temperature=TEMPERATURE).save(tmp_path / "model.pt")
    failure = export_model(final, client, "run")
    assert failure == "the exporter failed (RuntimeError: Failed to convert 'aten::frobnicate')"
    assert not (tmp_path / ONNX_FILE).exists() and client.artifacts == []
    assert client.tags == {EXPORT_FAILED_TAG: failure}
    (line,) = capsys.readouterr().out.splitlines()
    assert line.startswith(f"warning: --export onnx failed, model.onnx left out: {failure}")
