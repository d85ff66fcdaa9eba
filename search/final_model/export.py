"""The final model in other formats (final.py --export): ONNX, checked against PyTorch before it is kept.

model.onnx computes what the registered MLflow model computes (registry.scoring_model):
float32 images (N, 3, H, W) in [0, 1] in, softmax(logits / T) out, any batch size N.

It is exported with torch.onnx's dynamo exporter (torch.export, then ONNX Script), not
the TorchScript one (dynamo=False): TorchScript and its exporter are deprecated since
torch 2.9, and torch.export is the graph capture the registered 'pt2' model already
goes through, so a model that registers also exports. It also checks the batch dimension:
torch.export refuses a model that fixes it, where the TorchScript exporter's dynamic_axes
only label it, and a size its tracer turned into a constant shows up only when the file
runs at another N. Both exporters give files that match PyTorch for the three models.
The price: export is slower (about 30 s for the cnn on two CPU cores, 3 s for a
one-block vit) and needs onnxscript beside onnx.

The module imports only the standard library at its top: final.py asks `missing_packages`
before its arguments are valid, when nothing heavy may load yet.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    from torch import nn

EXPORT_FORMATS = ("onnx",)
ONNX_FILE = "model.onnx"
PACKAGES = {"onnx": ("onnx", "onnxscript", "onnxruntime")}
"""What each format needs, by import name: the exporter writes with onnx and onnxscript, the check runs
onnxruntime. The project's 'export' extra installs them."""
INSTALL = 'pip install "hpo-classifiers[export]"'
TOLERANCE = 1e-4
"""The largest difference of a probability between ONNX Runtime and PyTorch that passes the check."""
CHECK_IMAGES = 256
"""Test images the check runs through both: enough to meet every class and many confidences, few enough
that two CPU passes of a 224-pixel cnn take seconds, whatever the size of the test split."""
CHECK_BATCH = 32
INPUT_NAME, OUTPUT_NAME = "images", "probabilities"


class ExportMismatch(RuntimeError):
    """An exported file that computes something else than the PyTorch model."""


@dataclass(frozen=True)
class ExportCheck:
    """How the exported file compares with PyTorch on the same test images."""

    path: Path
    images: int
    """Test images compared."""
    of: int
    """Test images there were."""
    max_difference: float
    """max |p_onnx - p_torch| over those images and every class."""

    def line(self) -> str:
        sample = f"{self.images} test images" if self.images == self.of else f"{self.images} of {self.of} test images"
        return (
            f"Exported {self.path.name}: matches PyTorch on {sample}, largest difference of a probability "
            f"{self.max_difference:.1e} (tolerance {TOLERANCE:.0e})"
        )


def missing_packages(fmt: str | None) -> str | None:
    """A one-line problem naming the pip command when the format's packages are not installed, else None."""
    missing = [name for name in PACKAGES.get(fmt or "", ()) if importlib.util.find_spec(name) is None]
    if not missing:
        return None
    return f"--export {fmt} needs {', '.join(missing)}, not installed: {INSTALL}"


def export_onnx(scoring: nn.Module, test_images: np.ndarray, path: Path) -> ExportCheck:
    """Write scoring (registry.scoring_model, on the CPU) to path as ONNX with a dynamic batch dimension, and
    check it against PyTorch on the test images (uint8 (N, H, W, 3), as cached); raise ExportMismatch, and
    leave no file, if a probability differs by more than TOLERANCE."""
    import torch  # deferred: see the module's docstring

    batch = torch.export.Dim("batch")
    example = torch.from_numpy(model_input(test_images[:2]))  # 2, not 1: torch.export fixes a dimension of size 1
    program = torch.onnx.export(
        scoring,
        (example,),
        dynamo=True,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_shapes=({0: batch},),
        verbose=False,
    )
    assert program is not None  # the dynamo exporter returns the program
    program.save(str(path), external_data=False)  # one file: the weights inside, as a user expects model.onnx
    shown = test_images[:CHECK_IMAGES]
    difference = max_difference(scoring, path, shown)
    if not difference <= TOLERANCE:  # NaN fails too
        path.unlink()
        raise ExportMismatch(
            f"the exported {path.name} differs from the PyTorch model by up to {difference:.2e} in a probability "
            f"(tolerance {TOLERANCE:.0e}, on {len(shown)} test images): it was removed; the registered model and "
            f"model.pt are unaffected"
        )
    return ExportCheck(path, len(shown), len(test_images), difference)


def max_difference(scoring: nn.Module, path: Path, images: np.ndarray) -> float:
    """max |p_onnx - p_torch| over the images, batch by batch, on the CPU."""
    import numpy as np
    import onnxruntime
    import torch

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    differences = []
    for start in range(0, len(images), CHECK_BATCH):
        batch = model_input(images[start : start + CHECK_BATCH])
        with torch.no_grad():
            expected = scoring(torch.from_numpy(batch)).numpy()
        (got,) = session.run([OUTPUT_NAME], {INPUT_NAME: batch})
        differences.append(np.abs(got - expected).max())
    return float(np.max(differences))  # np.max, not max(): a NaN must come through and fail the check


def model_input(images: np.ndarray) -> np.ndarray:
    """Cached uint8 images (N, H, W, 3) as the model takes them: float32 (N, 3, H, W) in [0, 1]."""
    import numpy as np

    return np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32) / 255
