"""The final model in MLflow: logged as a torch.export graph that outputs class probabilities, and registered."""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path

import mlflow.pytorch
import numpy as np
import torch
from mlflow.models import infer_signature
from torch import nn

import mlflow
from trainables.data import CachedSplit

MODEL_ARTIFACT = "model"
MODEL_FILE_IN_MODEL = "extra_files/model.pt"
"""Where a registered version keeps the final run's model.pt (trainables.checkpoint.ModelFile): what
search/predict.py rebuilds the model from, to explain it (saliency needs the layers, not a graph)."""


def log_model(
    model: nn.Module, examples: CachedSplit, tracking_uri: str, run_id: str, register_name: str, model_file: Path
) -> dict:
    """Log the model as an MLflow model (probabilities out) and register it.

    MLflow saves it as a torch.export graph ('pt2'), not a pickle: loading it needs
    torch only, neither this project's code nor timm, and runs no pickled code. The
    version also carries model_file, the weights with their spec, for this project's tools.
    """
    # Float32 (N, 3, H, W) in [0, 1] in, one row of C class probabilities out: the model normalises itself.
    scoring = nn.Sequential(model, nn.Softmax(dim=1)).eval()
    example = np.ascontiguousarray(examples.images()[:2]).transpose(0, 3, 1, 2).astype(np.float32) / 255
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
    info = mlflow.pytorch.log_model(
        scoring,
        name=MODEL_ARTIFACT,
        model_id=logged.model_id,
        run_id=run_id,  # links the model to the run as its output (the run's Models column)
        signature=infer_signature(example, output),
        input_example=example,
        registered_model_name=register_name,
        serialization_format="pt2",  # the example's batch of 2 marks the batch dimension dynamic
        pip_requirements=pinned("torch", "numpy"),  # stated, not inferred: inference reloads the model
        extra_files=[str(model_file)],  # stored as MODEL_FILE_IN_MODEL
    )
    return {"name": register_name, "version": int(info.registered_model_version), "model_uri": info.model_uri}


def pinned(*packages: str) -> list[str]:
    """Installed versions, without local labels (+cpu, +cu130) that package indexes do not serve."""
    return [f"{name}=={version(name).split('+')[0]}" for name in packages]
