"""The registered model served as the README says: `mlflow models serve` on 127.0.0.1, a batch of images
POSTed to /invocations, calibrated probabilities back, equal to the model's own.

The model is one of this project's (a one-block vit at 32 pixels, untrained), logged and
registered by registry.log_model, the function final.py calls: what is served is what a
final run registers.
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request
import warnings

import numpy as np
import pytest
from helpers import free_port
from helpers.servers import http_server

CLASSES = ["benign", "cyst", "malignant", "normal"]
SIZE, TEMPERATURE, NAME = 32, 1.7, "tiny-classifier"
READY_WITHIN = 180.0
"""Seconds the server may take to start (import MLflow, download and load the model) on a busy machine."""

pytestmark = pytest.mark.slow


@pytest.fixture
def registered(tmp_path):
    """A tiny model of this project logged and registered in a store under tmp_path, its card and tags set."""
    import torch
    from mlflow.tracking import MlflowClient

    from search.final_model.registry import describe_version, log_model
    from trainables.checkpoint import ModelFile
    from trainables.config import DEFAULTS
    from trainables.models import build_model
    from trainables.scoring import scoring_network
    from trainables.spec import ModelSpec

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    experiment = client.create_experiment("serve", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id
    torch.manual_seed(0)
    spec = ModelSpec("vit", len(CLASSES), SIZE, pretrained=False, vit_depth=1)
    model = build_model(spec).eval()
    model_file = ModelFile(model.state_dict(), spec, DEFAULTS, CLASSES, {}, temperature=TEMPERATURE)
    model_file.save(tmp_path / "model.pt")
    info = log_model(tmp_path / "model.pt", uri, run_id, NAME)
    describe_version(client, info, "# tiny-classifier version 1\n", {"img_size": str(SIZE), "model": "vit"})
    return {"uri": uri, "client": client, "info": info, "scoring": scoring_network(model_file)}


def expected(scoring, images: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return scoring(torch.from_numpy(images)).numpy()


def images(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((count, 3, SIZE, SIZE), dtype=np.float32)


def test_the_version_carries_its_card_and_tags_and_its_serving_example_is_a_valid_request(registered):
    from mlflow.models.utils import load_serving_example

    import mlflow

    client, info = registered["client"], registered["info"]
    version = client.get_model_version(NAME, "1")
    assert version.description == "# tiny-classifier version 1\n"
    assert version.tags == {"img_size": str(SIZE), "model": "vit"}
    assert {"img_size": str(SIZE), "model": "vit"}.items() <= client.get_logged_model(info.model_id).tags.items()

    mlflow.set_tracking_uri(registered["uri"])
    example = load_serving_example(info.model_uri)
    assert list(json.loads(example)) == ["inputs"]  # the tensor form the scoring server takes
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deprecated for mlflow.models.predict, which needs an env
        probabilities = np.asarray(mlflow.models.validate_serving_input(info.model_uri, example))
    assert probabilities.shape == (2, len(CLASSES)) and np.allclose(probabilities.sum(axis=1), 1, atol=1e-6)

    loaded = mlflow.pyfunc.load_model(f"models:/{NAME}/1")
    for batch in (1, 5):  # the example's batch was 2: the batch dimension is dynamic
        scored = images(batch, seed=batch)
        assert np.abs(loaded.predict(scored) - expected(registered["scoring"], scored)).max() <= 1e-5


def test_mlflow_models_serve_answers_a_batch_with_the_model_s_calibrated_probabilities(registered, tmp_path):
    port = free_port()
    log = tmp_path / "serve.log"
    start = time.perf_counter()
    serve = ["mlflow", "models", "serve", "-m", f"models:/{NAME}/1", "--env-manager", "local"]
    command = [sys.executable, "-m", *serve, "--host", "127.0.0.1", "--port", str(port)]
    env = {**os.environ, "MLFLOW_TRACKING_URI": registered["uri"]}
    # Its own process group: the uvicorn worker it starts is stopped with it.
    ping = f"http://127.0.0.1:{port}/ping"
    with http_server(command, ping, "mlflow models serve", within=READY_WITHIN, cwd=tmp_path, env=env, log=log):
        ready = time.perf_counter() - start
        batch = images(3, seed=3)
        answer = post(port, {"inputs": batch.tolist()})
        answered = time.perf_counter() - start - ready
    print(f"\nmlflow models serve: ready in {ready:.1f} s, a batch of 3 answered in {answered:.2f} s")

    probabilities = np.asarray(answer["predictions"], dtype=np.float64)
    assert probabilities.shape == (3, len(CLASSES))
    assert np.allclose(probabilities.sum(axis=1), 1, atol=1e-5)
    assert np.abs(probabilities - expected(registered["scoring"], batch)).max() <= 1e-5


def post(port: int, payload: dict) -> dict:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/invocations",
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())
