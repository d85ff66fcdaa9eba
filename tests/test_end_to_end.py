"""run.py --smoke --data synthetic for each model, then read back what MLflow holds.

vit's is the session's study (tests/helpers/smoke_study.py), which other modules read back too;
cnn's and hybrid's run here.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml
from helpers import run_script
from helpers.smoke_study import NAME, Record
from helpers.smoke_study import TRIALS as SESSION_TRIALS

from search.records.study_config import SMOKE
from trainables.config import Hyperparameters
from trainables.data import cache_split, index_source, subsample
from trainables.engine import Learner
from trainables.models import ModelSpec, build_model

TRIALS = 2
# One epoch keeps the heavier models' CPU cost down (vit's study, the session's, shows learning).
EPOCHS = {"cnn": 1, "hybrid": 1}


def run_smoke_study(model: str, tmp_path: Path) -> tuple[object, str, str]:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    result = run_script(
        "run.py",
        "--model",
        model,
        "--trials",
        str(TRIALS),
        "--epochs",
        str(EPOCHS[model]),
        "--smoke",
        "--data",
        "synthetic",
        "--no-pretrained",
        "--name",
        f"e2e-{model}",
        "--tracking-uri",
        uri,
        "--storage-path",
        str(tmp_path / "ray"),
        "--cache-dir",
        str(tmp_path / "cache"),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri), uri, result.stdout


def reload_and_evaluate(checkpoint: dict, config: dict, cache_dir: Path) -> float:
    """Rebuild the best model from its checkpoint and score it on the study's val split."""
    index = subsample(index_source(config["data"], config["seed"]), SMOKE.per_class, config["seed"])
    val = cache_split(index, "val", config["img_size"], cache_dir)
    spec = ModelSpec(**{**checkpoint["model_spec"], "pretrained": False, "weights_files": ()})
    model = build_model(spec)
    model.load_state_dict(checkpoint["model"])
    hp = Hyperparameters.from_dict(checkpoint["hyperparameters"])
    return Learner(model, hp, torch.device("cpu"), config["metric"]).evaluate(val)["val_acc"]


def test_the_vit_smoke_study_is_recorded_in_mlflow_and_its_best_checkpoint_reproduces(smoke_study: Record, tmp_path):
    """The session's study: five trials of vit, one at a time, with the --smoke epochs."""
    study = smoke_study
    check_recorded_study(study.client, study.tracking_uri, study.console, "vit", NAME, SESSION_TRIALS, tmp_path)


# vit's study runs by default; cnn's and hybrid's (about a minute each on two cores) go through the same code
# with another model (test_models.py builds and runs each; test_compare_costs.py trains cnn a step).
@pytest.mark.slow
@pytest.mark.parametrize("model", ["cnn", "hybrid"])
def test_smoke_study_is_recorded_in_mlflow_and_its_best_checkpoint_reproduces(model, tmp_path):
    client, uri, stdout = run_smoke_study(model, tmp_path)
    check_recorded_study(client, uri, stdout, model, f"e2e-{model}", TRIALS, tmp_path, cache_dir=tmp_path / "cache")


def check_recorded_study(
    client, uri: str, stdout: str, model: str, name: str, trials: int, tmp_path: Path, cache_dir: Path | None = None
) -> None:
    """What MLflow holds of study `name` and what it printed; its best checkpoint reevaluated with `cache_dir`'s
    images (a folder under tmp_path where none is given, so that the study's own cache is only read)."""
    experiment = client.get_experiment_by_name(model)
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.study = '{name}'")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]

    # One parent with settings, data summary, best config and metric.
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.params["model"] == model and parent.data.params["num_classes"] == "11"
    assert int(parent.data.params["train_images"]) == 11 * SMOKE.per_class["train"]
    assert parent.data.params["img_size"] == str(SMOKE.img_size)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "best")}
    assert artifacts == {"best/best_config.yaml"}  # the checkpoint is the logged model's

    # One child per trial: params, per-epoch metrics (step = epoch), a final status.
    assert len(children) == trials
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.data.tags["trial_status"] in ("completed", "pruned")
        assert {"lr", "batch_size", "weight_decay"} <= set(child.data.params)
        history = client.get_metric_history(child.info.run_id, "val_acc")
        assert [m.step for m in history] == list(range(1, len(history) + 1))
        for key in ("train_loss", "val_loss", "val_balanced_acc", "val_macro_f1"):
            assert len(client.get_metric_history(child.info.run_id, key)) == len(history)

    # The winner is the study run's logged model: its checkpoint reloads and reproduces the reported val accuracy.
    import mlflow

    (output,) = parent.outputs.model_outputs
    logged = client.get_logged_model(output.model_id)
    assert logged.name == f"{name}-best" and logged.source_run_id == parent.info.run_id
    local = Path(mlflow.artifacts.download_artifacts(logged.artifact_location, dst_path=str(tmp_path / "download")))
    config = yaml.safe_load((local / "best_config.yaml").read_text())
    checkpoint = torch.load(local / "best_model.pt", weights_only=True)
    best_reported = parent.data.metrics["best_val_acc"]
    assert config["best_value"] == pytest.approx(best_reported)
    assert max(c.data.metrics["val_acc"] for c in children) >= best_reported - 1e-9
    cache = cache_dir or tmp_path / "cache"
    assert reload_and_evaluate(checkpoint, config, cache) == pytest.approx(best_reported, abs=1e-9)

    # The closing lines say where things are and how to open MLflow on loopback.
    assert "best_config.yaml" in stdout and "best_model.pt" in stdout
    assert f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1" in stdout
    # The winner's knobs, those of its model only: vit_depth is a ViT's, fusion a hybrid's.
    knobs = set(re.findall(r"^  (\w+) ", stdout, re.M))
    assert {"lr", "batch_size"} <= knobs
    assert ("vit_depth" in knobs) == (model in ("vit", "hybrid")) and ("fusion" in knobs) == (model == "hybrid")
    if model == "vit":
        assert best_reported > 2 / 11  # learns: well above chance (1/11) in its epochs
