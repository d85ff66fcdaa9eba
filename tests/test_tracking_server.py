"""A study, its --resume and final.py against an `mlflow server` (sqlite backend, proxied artifacts): HTTP only.

The server runs in a folder of its own; the project folder must end up with no
tracking data of its own (no mlruns/, no mlflow/), and everything the study and the
retrain record must be found through the server.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
from helpers import ROOT, free_port, interrupted_study, run_script
from helpers.servers import http_server

pytestmark = pytest.mark.slow

NAME = "served"
STUDY = ("--model", "vit", "--trials", "2", "--epochs", "2", "--smoke", "--data", "synthetic:3", "--no-pretrained")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`mlflow server` on 127.0.0.1 with a SQLite backend and artifacts proxied into its own folder."""
    folder = tmp_path_factory.mktemp("server")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
               "--backend-store-uri", f"sqlite:///{folder}/server.db",
               "--artifacts-destination", str(folder / "artifacts")]  # fmt: skip
    with http_server(command, f"{url}/health", "mlflow server", within=120, cwd=folder, interval=1):
        yield url, folder


def test_a_study_its_resume_and_its_retrain_work_through_the_server_alone(server, tmp_path):
    url, server_folder = server
    project = tmp_path / "project"
    project.mkdir()
    shutil.copytree(ROOT / "spaces", project / "spaces")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    # Stopped with Ctrl-C once its first trial has reported an epoch, then resumed.
    code, output = interrupted_study(
        *STUDY, "--name", NAME, "--tracking-uri", url, marker=" epoch  1/2", cwd=project, env=env
    )
    assert code == 130, output[-3000:]

    resumed = run_script("run.py", *STUDY, "--name", NAME, "--tracking-uri", url, "--resume", cwd=project)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    retrained = run_script("final.py", "--study", NAME, "--tracking-uri", url, "--no-pretrained", cwd=project)
    assert retrained.returncode == 0, retrained.stdout[-3000:] + retrained.stderr[-3000:]

    # Where to look is the server itself, said once; MLflow's own "View run" lines are not printed.
    for result in (resumed, retrained):
        assert f"MLflow:     open {url}/#/experiments/" in result.stdout
        assert "mlflow ui --backend-store-uri" not in result.stdout and "View run" not in result.stdout

    # Nothing of the record is kept in the project folder.
    assert not (project / "mlruns").exists() and not (project / "mlflow").exists()

    from mlflow.tracking import MlflowClient

    client = MlflowClient(url)
    experiment = client.get_experiment_by_name("vit")
    runs = client.search_runs([experiment.experiment_id], f"tags.study = '{NAME}'")
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags and "role" not in r.data.tags]
    (final,) = [r for r in runs if r.data.tags.get("role") == "final"]
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.info.status == "FINISHED" and final.info.status == "FINISHED"
    assert len(trials) == 2 and all(r.info.status == "FINISHED" for r in trials)
    assert {"study.yaml", "best"} <= {item.path for item in client.list_artifacts(parent.info.run_id)}
    assert "test_predictions.csv" in {item.path for item in client.list_artifacts(final.info.run_id)}
    (version,) = client.search_model_versions("name = 'vit-classifier'")
    assert version.run_id == final.info.run_id

    # The files went through the server into its own artifact folder.
    stored = {path.name for path in Path(server_folder, "artifacts").rglob("*") if path.is_file()}
    assert {"study.yaml", "best_config.yaml", "test_predictions.csv", "MLmodel", "checklist.md"} <= stored
    # the checklist went into the registered version's model files, through the server too
    import mlflow

    mlflow.set_tracking_uri(url)  # the registry's too: models:/ resolves through the server
    shipped = mlflow.artifacts.download_artifacts(
        f"models:/vit-classifier/{version.version}/checklist.md", dst_path=str(tmp_path / "got")
    )
    assert Path(shipped).read_text().startswith("# Reporting checklist: vit-classifier version 1")
