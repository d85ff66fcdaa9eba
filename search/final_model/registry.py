"""The final model in MLflow: logged as a torch.export graph that outputs class probabilities (the model file's
scoring network, trainables.scoring: its members and flips in one graph), registered, and described (its model
card as the version's description, its key facts as tags)."""

from __future__ import annotations

import contextlib
import io
import sys
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path

import mlflow.pytorch
import numpy as np
import torch
from mlflow.models import infer_signature

import mlflow
from search.records.registration import Registration
from search.tracking.schema import FINAL_MODEL_FILE
from trainables.checkpoint import ModelFile
from trainables.scoring import scoring_network

MODEL_ARTIFACT = "model"
EXAMPLE_GREY = 0.5
"""The input example's one pixel value (see example_input)."""
REGISTRY_LINES = ("Successfully registered model ", "Registered model ", "Created version ")
"""How MLflow's lines about a registration start (mlflow.tracking._model_registry.fluent prints them to stderr):
final.py says itself which version it registered."""


def example_input(img_size: int) -> np.ndarray:
    """Two mid-grey images, (2, 3, H, W) float32: MLflow's input example, and the trace of the pt2 export.

    Two, because torch.export fixes a dimension of size 1: a batch of 2 leaves the batch dimension
    dynamic (N = 1 and N = 5 are served alike). Grey, not test images: the example is stored in the
    model for anyone who loads it, and a test image may be a patient's; grey also keeps its JSON (the
    serving example, a valid /invocations request) short.
    """
    return np.full((2, 3, img_size, img_size), EXAMPLE_GREY, dtype=np.float32)


def log_model(model_file: Path, tracking_uri: str, run_id: str, register_name: str) -> Registration:
    """Log the model file's scoring network as an MLflow model (calibrated probabilities out, averaged over its
    members and flips) and register it.

    MLflow saves it as a torch.export graph ('pt2'), not a pickle: loading it needs
    torch only, neither this project's code nor timm, and runs no pickled code. The
    version also carries model_file, the weights with their spec, for this project's tools.
    """
    if model_file.name != FINAL_MODEL_FILE:  # MLflow keeps the name: predict.py looks for MODEL_FILE_IN_MODEL
        raise ValueError(f"the model file to register must be named {FINAL_MODEL_FILE}, not {model_file.name}")
    loaded = ModelFile.load(model_file)  # the file that is registered is the model that is logged
    scoring = scoring_network(loaded)
    example = example_input(loaded.spec.img_size)
    with torch.no_grad():
        output = scoring(torch.from_numpy(example)).numpy()
    mlflow.set_tracking_uri(tracking_uri)
    # The model belongs to the run's experiment, and so do its files (beside the store). Left to
    # itself, log_model puts it in the active experiment, and with none active that is experiment 0
    # ("Default"), whose files go to ./mlruns in whatever folder the script runs from.
    run = mlflow.get_run(run_id)
    logged = mlflow.initialize_logged_model(
        name=MODEL_ARTIFACT,
        source_run_id=run_id,
        experiment_id=run.info.experiment_id,
        params=run.data.params,  # as log_model does when it creates the model itself
    )
    with lines_hidden(REGISTRY_LINES):  # final.py's own line names the version
        info = mlflow.pytorch.log_model(
            scoring,
            name=MODEL_ARTIFACT,
            model_id=logged.model_id,
            run_id=run_id,  # links the model to the run as its output (the run's Models column)
            # Tensor specs (-1, 3, H, W) float32 in, (-1, C) out: the scoring server then takes {"inputs": [...]}.
            signature=infer_signature(example, output),
            input_example=example,  # saved as serving_input_example.json, a valid /invocations request
            registered_model_name=register_name,
            serialization_format="pt2",
            pip_requirements=pinned("torch", "numpy"),  # stated, not inferred: inference reloads the model
            extra_files=[str(model_file)],  # stored as MODEL_FILE_IN_MODEL
        )
    return Registration(
        name=register_name,
        version=int(info.registered_model_version),
        model_uri=info.model_uri,
        model_id=info.model_id,
    )


class LineFilter(io.TextIOBase):
    """A text stream that passes whole lines on to `target`, less those that start with one of `prefixes`."""

    def __init__(self, target, prefixes: tuple[str, ...]):
        self.target, self.prefixes, self.pending = target, prefixes, ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        *lines, self.pending = (self.pending + text).split("\n")
        for line in lines:
            if not line.startswith(self.prefixes):
                self.target.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        self.target.flush()

    def close_pending(self) -> None:
        """A last line without its newline, passed on (or dropped) all the same."""
        if self.pending and not self.pending.startswith(self.prefixes):
            self.target.write(self.pending)
        self.pending = ""


@contextlib.contextmanager
def lines_hidden(prefixes: tuple[str, ...]) -> Iterator[None]:
    """Within the block, lines written to sys.stderr that start with one of `prefixes` are dropped; every other
    line (a warning, MLflow's own log) still reaches the terminal. MLflow writes to whatever sys.stderr is when
    it prints, so the swap reaches its lines."""
    filtered = LineFilter(sys.stderr, prefixes)
    try:
        with contextlib.redirect_stderr(filtered):
            yield
    finally:
        filtered.close_pending()
        filtered.flush()


def describe_version(client, registered: Registration, card: str, tags: dict[str, str]) -> None:
    """The model card as the registered version's description; the tags on the version and on its logged model.

    Not on the registered model: its versions differ in accuracy and temperature, and a tag there would
    say only what the latest version was.
    """
    name, number = registered.name, str(registered.version)
    client.update_model_version(name, number, description=card)
    for key, value in tags.items():
        client.set_model_version_tag(name, number, key, value)
    client.set_logged_model_tags(registered.model_id, tags)


def attach_checklist(client, registered: Registration, path: Path, summary: str) -> None:
    """The reporting checklist among the registered version's model files, beside MLmodel and model.pt: the
    version's Artifacts show it, and models:/NAME/VERSION/checklist.md downloads it; `summary` (how many items
    are answered, where the file is) as the version's 'checklist' tag, seen in the list of versions."""
    from search.final_model.checklist import CHECKLIST_TAG  # the checklist's own name for it

    client.log_model_artifact(registered.model_id, str(path))
    client.set_model_version_tag(registered.name, str(registered.version), CHECKLIST_TAG, summary)


def pinned(*packages: str) -> list[str]:
    """Installed versions, without local labels (+cpu, +cu130) that package indexes do not serve."""
    return [f"{name}=={version(name).split('+')[0]}" for name in packages]
