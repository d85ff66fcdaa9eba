"""final.py --export onnx: model.onnx computes what PyTorch computes, at any batch size; refusals come first.

The exports build this project's models (trainables.models.build_model) at 32 pixels
without pretrained weights. A one-block vit exports in seconds and runs by default; the
cnn and hybrid carry the whole tf_efficientnetv2_s (about 30 s each on two cores) and
are marked slow.
"""

from __future__ import annotations

import importlib.util
import time

import numpy as np
import pytest

from search.final_model import export
from search.final_model.export import INPUT_NAME, INSTALL, ONNX_FILE, TOLERANCE, ExportMismatch, export_onnx

CLASSES, SIZE, TEMPERATURE = 4, 32, 1.7


def scoring(name: str):
    import torch

    from search.final_model.registry import scoring_model
    from trainables.models import build_model
    from trainables.spec import ModelSpec

    torch.manual_seed(0)
    model = build_model(ModelSpec(name, CLASSES, SIZE, pretrained=False, vit_depth=1))
    return scoring_model(model, TEMPERATURE)


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
    assert check.max_difference <= TOLERANCE and check.images == check.of == 6
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
        assert np.abs(probabilities - expected).max() <= TOLERANCE


def test_a_vit_exports_to_onnx_that_matches_pytorch_at_any_batch_size(tmp_path):
    exported_matches_pytorch("vit", tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["cnn", "hybrid"])
def test_the_cnn_and_the_hybrid_export_to_onnx_that_matches_pytorch(tmp_path, name):
    exported_matches_pytorch(name, tmp_path)


def test_an_export_that_differs_from_pytorch_fails_and_leaves_no_file(tmp_path, monkeypatch):
    from torch import nn

    from search.final_model.registry import scoring_model

    tiny = scoring_model(nn.Sequential(nn.Flatten(), nn.Linear(3 * SIZE * SIZE, CLASSES)), TEMPERATURE)  # fast
    monkeypatch.setattr(export, "max_difference", lambda *args: float("nan"))
    with pytest.raises(ExportMismatch, match="differs from the PyTorch model by up to nan"):
        export_onnx(tiny, cached_images(2), tmp_path / ONNX_FILE)
    assert not (tmp_path / ONNX_FILE).exists()


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
