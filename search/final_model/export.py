"""The final model in other formats (final.py --export): ONNX, checked against PyTorch before it is kept.

model.onnx computes what the registered MLflow model computes (trainables.scoring.scoring_network):
float32 images (N, 3, H, W) in [0, 1] in, softmax(logits / T) out, any batch size N; for an ensemble
or a model file with test-time flips, every member and flip in one graph, averaged as the registered model averages.

It is exported with torch.onnx's dynamo exporter (torch.export, then ONNX Script), not
the TorchScript one (dynamo=False): TorchScript and its exporter are deprecated since
torch 2.9, and torch.export is the graph capture the registered 'pt2' model already
goes through, so a model that registers also exports. It also checks the batch dimension:
torch.export refuses a model that fixes it, where the TorchScript exporter's dynamic_axes
only label it, and a size its tracer turned into a constant shows up only when the file
runs at another N. Both exporters give files that match PyTorch for the three models.
The price: export is slower (about 30 s for the cnn on two CPU cores, 3 s for a
one-block vit) and needs onnxscript beside onnx.

final.py exports once the model is registered: a file that fails the check, or an exporter that fails,
leaves the retrain whole and model.onnx out (retrain.export_model).

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
RELATIVE_TOLERANCE = 1e-2
ABSOLUTE_TOLERANCE = 1e-6
"""The check passes where every probability agrees: |p_onnx - p_torch| <= ABSOLUTE + RELATIVE * p_torch.

On the probabilities, not the logits: they are what model.onnx outputs and what a user reads. Relative,
because that is how float32's disagreement reaches a probability: the two runtimes sum in other orders
(other convolution and matrix kernels, fused layer norms, erf), so a logit differs by some small dz and
the softmax passes it on in proportion, dp_i = p_i (dz_i - sum_j p_j dz_j) / T: a bound on dp / p bounds
dz / T, however confident the model. An absolute bound alone (1e-4 until issue 23) is loose for small
probabilities and tight near p = 0.5, where dp peaks: a retrain on real images failed it at 1.05e-04.
The absolute term is for probabilities near 0, whose float32 rounding is relative to nothing useful.

Measured with bench/onnx_agreement.py (cnn, 12-block vit, hybrid; random weights after 20 AdamW steps, logits
up to 17; 32 and 224 px; synthetic, structured and noise images; T = 1 and 0.5; 2-core AMD EPYC, torch
2.14.1, onnxruntime 1.32.0): |dp| at most 2.8e-06 and |dp| / p at most 3.3e-05 (|dz| at most 1.4e-05,
2.2e-06 of the largest logit), which uses at most 0.18 % of this tolerance. Real faults use many times
it: a temperature 5 % off 6 to 36 times, images not normalised 9 to 1e6 times, the model left in train
mode (dropout, batch statistics) 290 to 1e6 times.
"""
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
    share: float
    """The largest |p_onnx - p_torch| / (ABSOLUTE_TOLERANCE + RELATIVE_TOLERANCE * p_torch): at most 1 passes."""

    def line(self) -> str:
        sample = f"{self.images} test images" if self.images == self.of else f"{self.images} of {self.of} test images"
        return (
            f"Exported {self.path.name}: matches PyTorch on {sample}, largest difference of a probability "
            f"{self.max_difference:.1e}, {100 * self.share:.2g} % of the tolerance ({TOLERANCE_TEXT})"
        )


TOLERANCE_TEXT = f"{RELATIVE_TOLERANCE:.0%} of the probability + {ABSOLUTE_TOLERANCE:.0e}"


def missing_packages(fmt: str | None) -> str | None:
    """A one-line problem naming the pip command when the format's packages are not installed, else None."""
    missing = [name for name in PACKAGES.get(fmt or "", ()) if importlib.util.find_spec(name) is None]
    if not missing:
        return None
    return f"--export {fmt} needs {', '.join(missing)}, not installed: {INSTALL}"


def export_onnx(scoring: nn.Module, test_images: np.ndarray, path: Path) -> ExportCheck:
    """Write scoring (trainables.scoring.ScoringNetwork, on the CPU) to path as ONNX with a dynamic batch
    dimension, and check it against PyTorch on the test images (uint8 (N, H, W, 3), as cached); raise
    ExportMismatch, and leave no file, if a probability differs by more than the tolerance (RELATIVE_TOLERANCE's
    docstring)."""
    write_onnx(scoring, test_images, path)
    shown = test_images[:CHECK_IMAGES]
    check = ExportCheck(path, len(shown), len(test_images), *agreement(*both_probabilities(scoring, path, shown)))
    if not check.share <= 1:  # NaN fails too
        path.unlink()
        raise ExportMismatch(
            f"the exported {path.name} differs from the PyTorch model by up to {check.max_difference:.2e} in a "
            f"probability, {check.share:.3g} times the tolerance ({TOLERANCE_TEXT}), on {len(shown)} test images"
        )
    return check


def write_onnx(module: nn.Module, images: np.ndarray, path: Path, outputs: tuple[str, ...] = (OUTPUT_NAME,)) -> None:
    """Export module (on the CPU) to path as one ONNX file with a dynamic batch dimension, traced on two of the
    images (uint8 (N, H, W, 3), as cached); `outputs` names its outputs."""
    import torch  # deferred: see the module's docstring

    batch = torch.export.Dim("batch")
    example = torch.from_numpy(model_input(images[:2]))  # 2, not 1: torch.export fixes a dimension of size 1
    program = torch.onnx.export(
        module,
        (example,),
        dynamo=True,
        input_names=[INPUT_NAME],
        output_names=list(outputs),
        dynamic_shapes=({0: batch},),
        verbose=False,
    )
    assert program is not None  # the dynamo exporter returns the program
    program.save(str(path), external_data=False)  # one file: the weights inside, as a user expects model.onnx


def both_probabilities(scoring: nn.Module, path: Path, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The probabilities of the images (N, C) from ONNX Runtime and from PyTorch, batch by batch, on the CPU."""
    import numpy as np
    import onnxruntime
    import torch

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got, expected = [], []
    for start in range(0, len(images), CHECK_BATCH):
        batch = model_input(images[start : start + CHECK_BATCH])
        with torch.no_grad():
            expected.append(scoring(torch.from_numpy(batch)).numpy())
        got.append(session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0])
    return np.concatenate(got), np.concatenate(expected)


def agreement(got: np.ndarray, expected: np.ndarray) -> tuple[float, float]:
    """(max |got - expected|, the largest share of the tolerance it uses): NaN where either holds a NaN."""
    import numpy as np

    difference = np.abs(got.astype(np.float64) - expected)
    allowed = ABSOLUTE_TOLERANCE + RELATIVE_TOLERANCE * np.abs(expected.astype(np.float64))
    return float(np.max(difference)), float(np.max(difference / allowed))  # np.max, not max(): NaN comes through


def model_input(images: np.ndarray) -> np.ndarray:
    """Cached uint8 images (N, H, W, 3) as the model takes them: float32 (N, 3, H, W) in [0, 1]."""
    import numpy as np

    return np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32) / 255
