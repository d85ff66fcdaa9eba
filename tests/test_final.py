"""final.py after one --smoke study: retrain the winner, test it once, register it; refuse bad input.

One study for the whole module, on a class-folder dataset whose test images are
replaced by unreadable bytes while the study runs: had the search decoded any of
them, it would have reported them as skipped. They are restored before final.py,
which must then read them. Both scripts run as a user runs them, from a folder laid
out like the project (its spaces/) with the default store, Ray folder and image cache,
all relative to it: whatever they write lands there, where the tests can look.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlparse

import numpy as np
import pytest
import yaml
from helpers import ROOT, run_script, write_image_folder
from helpers.cli import call_main, heavy_modules_loaded, one_line_refusal

from search.records.study_config import SMOKE
from search.tracking.store import read_artifact
from trainables.data import index_source, subsample

NAME, MODEL, SEED = "fstudy", "vit", 0
CLASSES = {"benign": 40, "cyst": 40, "malignant": 40, "normal": 40}
# One torch thread, in final.py and in this process alike: the machine is shared (two threads on a
# busy core wait on each other, ten times slower), and the in-process retrain must match bit for bit.
THREADS = 1


def final(study, *args: str):
    """final.py from the project folder, with the default store and cache, its output written to out/.

    Its output is read as bytes: text mode would turn a progress bar's carriage returns into newlines.
    """
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, str(ROOT / "search" / "final.py"), *args, "--no-pretrained", "--out", "out"],
        cwd=study.root,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(THREADS)},
        capture_output=True,
        timeout=900,
    )
    result.stdout, result.stderr = result.stdout.decode(), result.stderr.decode()
    result.seconds = time.perf_counter() - start
    return result


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("final")
    shutil.copytree(ROOT / "spaces", root / "spaces")
    images = write_image_folder(root / "images", CLASSES, size=40)
    index = index_source(images, SEED)
    test_files = [images / s.key for s in index.splits["test"]]
    originals = {path: path.read_bytes() for path in test_files}
    try:
        for path in test_files:
            path.write_bytes(b"not an image: the search must never decode this file")
        searched = run_script(
            "run.py",
            "--model",
            MODEL,
            "--trials",
            "2",
            "--epochs",
            "2",
            "--smoke",
            "--data",
            str(images),
            "--no-pretrained",
            "--seed",
            str(SEED),
            "--name",
            NAME,
            cwd=root,
        )
    finally:
        for path, content in originals.items():
            path.write_bytes(content)
    assert searched.returncode == 0, searched.stdout[-3000:] + searched.stderr[-3000:]

    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{root}/mlflow/mlflow.db"  # the default sqlite:///mlflow/mlflow.db, seen from the project
    cache = root / ".cache" / "images"  # shared with final.py: what the search alone cached is noted now
    namespace = SimpleNamespace(
        root=root,
        uri=uri,
        images=images,
        client=MlflowClient(uri),
        split=subsample(index, SMOKE.per_class, SEED),
        test_files=set(test_files),
        search_cache={p.name: np.load(p, mmap_mode="r").shape[0] for p in cache.glob("*.npy")},
    )
    namespace.first = final(namespace, "--study", NAME)
    assert namespace.first.returncode == 0, namespace.first.stdout[-3000:] + namespace.first.stderr[-3000:]
    print(f"\nfinal.py --study on the smoke study: {namespace.first.seconds:.1f} s")
    return namespace


def runs_of(client, study_name: str) -> list:
    experiment = client.get_experiment_by_name(MODEL)
    return list(client.search_runs([experiment.experiment_id], filter_string=f"tags.study = '{study_name}'"))


def first_final(study):
    """The run of the module's final.py --study (the one whose results are in out/)."""
    run_id = json.loads((study.root / "out" / "metrics.json").read_text())["mlflow"]["run_id"]
    return study.client.get_run(run_id)


def study_parent(client):
    (parent,) = [
        r for r in runs_of(client, NAME) if "mlflow.parentRunId" not in r.data.tags and "role" not in r.data.tags
    ]
    return parent


# ---------------------------------------------------------------- the final run

TEST_METRICS = ("test_acc", "test_balanced_acc", "test_macro_f1", "test_roc_auc", "test_ece", "test_loss")
INTERVAL_BOUNDS = tuple(
    f"{key}_ci_{end}"
    for key in ("test_acc", "test_balanced_acc", "test_macro_f1", "test_roc_auc", "test_ece")
    for end in ("low", "high")
)
CALIBRATION_METRICS = ("temperature", "test_ece_uncalibrated", "test_loss_uncalibrated")


def test_final_run_logs_params_epochs_test_metrics_and_artifacts(study):
    run = first_final(study)
    parent = study_parent(study.client)
    best = yaml.safe_load((study.root / "ray_results" / NAME / "best" / "best_config.yaml").read_text())
    assert run.info.status == "FINISHED" and "mlflow.parentRunId" not in run.data.tags
    assert run.data.tags["study"] == NAME and run.info.experiment_id == parent.info.experiment_id

    params = run.data.params
    assert params["train_on"] == "train+val" and params["epochs"] == str(best["best_epoch"])
    assert params["lr"] == str(best["hyperparameters"]["lr"]) and params["img_size"] == str(SMOKE.img_size)
    assert int(params["train_images"]) == len(study.split.splits["train"]) + len(study.split.splits["val"])

    history = study.client.get_metric_history(run.info.run_id, "train_loss")
    assert [m.step for m in history] == list(range(1, best["best_epoch"] + 1))
    metrics = run.data.metrics
    for key in TEST_METRICS:
        assert np.isfinite(metrics[key]), key
    assert 0 <= metrics["test_ece"] <= 1 and 0.5 <= metrics["test_roc_auc"] <= 1
    assert metrics["test_acc"] > 1 / len(CLASSES)  # learns: above chance
    # nothing per class: see below
    assert set(metrics) == {"train_loss", "lr", "trained_epochs", *TEST_METRICS, *INTERVAL_BOUNDS, *CALIBRATION_METRICS}
    for key in ("test_acc", "test_roc_auc"):
        assert metrics[f"{key}_ci_low"] <= metrics[key] <= metrics[f"{key}_ci_high"], key
    # The default retrain trained on val: nothing is left to fit a temperature on, and the run says so.
    assert params["calibration_split"] == "none" and metrics["temperature"] == 1.0
    assert metrics["test_ece_uncalibrated"] == metrics["test_ece"]

    artifacts = {a.path for a in study.client.list_artifacts(run.info.run_id)}
    assert {
        "confusion_matrix.png",
        "classification_report.txt",
        "metrics.json",
        "config.yaml",
        "classes.json",
        "splits.json",
        "per_class_metrics.json",
        "test_predictions.csv",
        "reliability_diagram.png",
    } <= artifacts
    out = study.root / "out"
    written = json.loads((out / "metrics.json").read_text())
    assert written["calibration"]["split"] is None and written["calibration"]["temperature"] == 1.0
    assert written["intervals"]["resamples"] == 2000
    assert written["intervals"]["test_acc"] == pytest.approx([metrics["test_acc_ci_low"], metrics["test_acc_ci_high"]])
    assert (out / "reliability_diagram.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "classes.json").read_text()) == sorted(CLASSES)
    assert json.loads((out / "metrics.json").read_text())["test"]["test_acc"] == pytest.approx(metrics["test_acc"])
    assert (out / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"
    assert "malignant" in (out / "classification_report.txt").read_text()
    import torch

    weights = torch.load(out / "model.pt", weights_only=True)
    assert weights["classes"] == sorted(CLASSES) and weights["model_spec"]["name"] == MODEL
    assert weights["temperature"] == metrics["temperature"]

    # The short report puts the search's best validation accuracy beside the test accuracy.
    stdout = study.first.stdout
    assert f"Search's best val_acc {best['best_value']:.4f}  vs  test_acc {metrics['test_acc']:.4f}" in stdout
    assert "registered as vit-classifier version" in stdout
    assert f"accuracy            {metrics['test_acc']:.4f}  (95 % CI {metrics['test_acc_ci_low']:.4f}" in stdout
    assert "Calibration: none" in stdout and "lowest sensitivity" in stdout and "lowest specificity" in stdout


def test_per_class_scores_are_one_table_artifact_with_a_row_per_class(study):
    """Not three metrics per class, which would crowd the run's chart view (33 charts for 11 classes)."""
    run = first_final(study)
    table = json.loads(read_artifact(study.client, run.info.run_id, "per_class_metrics.json"))
    assert table["columns"] == ["class", "precision", "recall", "f1", "support", "sensitivity", "specificity"]
    per_class = json.loads((study.root / "out" / "metrics.json").read_text())["per_class"]
    assert [row[0] for row in table["data"]] == sorted(CLASSES) == list(per_class)
    for name, *scores in table["data"]:
        assert scores == pytest.approx([per_class[name][key] for key in table["columns"][1:]]), name
    support = table["columns"].index("support")
    assert sum(row[support] for row in table["data"]) == int(run.data.params["test_images"])
    # Logged as a table, so that the UI shows it as one (artifact view, evaluation tables).
    assert {"path": "per_class_metrics.json", "type": "table"} in json.loads(run.data.tags["mlflow.loggedArtifacts"])
    assert not [key for key in run.data.metrics if "/" in key]


def test_per_image_test_predictions_are_recorded_and_read_back_to_the_run_s_scores(study):
    """compare.py pairs models image by image from this file: every test image, in the split's order."""
    from search.evaluation.predictions import read_predictions

    run = first_final(study)
    text = read_artifact(study.client, run.info.run_id, "test_predictions.csv")
    predictions = read_predictions(text, "the final run's predictions")
    assert predictions.keys == [sample.key for sample in study.split.splits["test"]]
    assert predictions.classes == sorted(CLASSES)
    assert predictions.probabilities.shape == (len(predictions.keys), len(CLASSES))
    assert np.allclose(predictions.probabilities.sum(axis=1), 1, atol=1e-6)
    assert predictions.correct.mean() == pytest.approx(run.data.metrics["test_acc"])
    assert text.splitlines()[0] == "image,label,prediction," + ",".join(f"p:{c}" for c in sorted(CLASSES))


def test_output_to_a_file_is_one_line_per_epoch_and_no_progress_bars(study):
    """final.py's output captured (not a terminal, as under nohup or in a cluster job): plain lines."""
    epochs = int(first_final(study).data.params["epochs"])
    lines = [line for line in study.first.stdout.splitlines() if line.startswith("epoch ")]
    assert len(lines) == epochs, study.first.stdout
    for number, line in enumerate(lines, 1):
        assert re.fullmatch(rf"epoch {number}/{epochs}  train_loss \d+\.\d{{4}}  \(\d+\.\d s\)", line), line
    assert "\r" not in study.first.stdout + study.first.stderr


def test_a_terminal_gets_progress_bars_instead_of_epoch_lines(study, one_thread, monkeypatch, capsys):
    from search.final_model import retrain

    monkeypatch.setattr(retrain, "bars_wanted", lambda: True)
    retrain_in_process(study, "--epochs", "1")
    captured = capsys.readouterr()
    assert "retrain: 100%" in captured.err and "1/1" in captured.err
    assert not [line for line in captured.out.splitlines() if line.startswith("epoch ")]


def test_the_model_is_logged_in_the_study_experiment_with_its_files_beside_the_store(study):
    """Not in experiment 0 ("Default"), whose files go to ./mlruns in whatever folder final.py runs from."""
    run = first_final(study)
    assert not list(study.root.rglob("mlruns"))
    (output,) = run.outputs.model_outputs  # the run's Models column in the UI
    logged = study.client.get_logged_model(output.model_id)
    assert logged.experiment_id == run.info.experiment_id == study_parent(study.client).info.experiment_id
    assert logged.source_run_id == run.info.run_id and logged.status == "READY"
    assert output.model_id in [m.model_id for m in study.client.search_logged_models([run.info.experiment_id])]

    (version,) = [
        v for v in study.client.search_model_versions("name = 'vit-classifier'") if v.run_id == run.info.run_id
    ]
    assert version.source == f"models:/{logged.model_id}"  # the version is this logged model
    artifacts = (study.root / "mlflow" / "artifacts").resolve()
    stored = Path(urlparse(study.client.get_model_version_download_uri("vit-classifier", version.version)).path)
    assert stored.is_relative_to(artifacts) and (stored / "MLmodel").is_file()
    assert Path(urlparse(logged.artifact_location).path).is_relative_to(artifacts)
    # test_registered_model_loads_... loads it from there.


def test_registered_model_loads_and_returns_one_row_of_class_scores_per_image(study):
    import torch

    import mlflow

    run = first_final(study)
    (version,) = [
        v for v in study.client.search_model_versions("name = 'vit-classifier'") if v.run_id == run.info.run_id
    ]
    mlflow.set_tracking_uri(study.uri)
    model = mlflow.pytorch.load_model(f"models:/vit-classifier/{version.version}")
    images = torch.rand(5, 3, SMOKE.img_size, SMOKE.img_size)
    scores = model(images)
    assert tuple(scores.shape) == (5, len(CLASSES))
    assert torch.allclose(scores.sum(dim=1), torch.ones(5), atol=1e-5)  # class probabilities
    signature = mlflow.models.get_model_info(f"models:/vit-classifier/{version.version}").signature
    assert signature.inputs.inputs[0].shape == (-1, 3, SMOKE.img_size, SMOKE.img_size)


def test_the_registered_version_carries_the_model_card_and_tags(study):
    from search.final_model.card import MODEL_CARD_FILE

    run = first_final(study)
    (version,) = [
        v for v in study.client.search_model_versions("name = 'vit-classifier'") if v.run_id == run.info.run_id
    ]
    card = (study.root / "out" / MODEL_CARD_FILE).read_text()
    assert read_artifact(study.client, run.info.run_id, MODEL_CARD_FILE) == card == version.description
    assert re.findall(r"^## (.+)$", card, flags=re.MULTILINE) == [
        "Intended use and limits",
        "Input and output",
        "Data",
        "Where it came from",
        "Training",
        "Test results",
        "Calibration",
        "Per class",
    ]
    sizes = {split: len(study.split.splits[split]) for split in ("train", "val", "test")}
    per_class = json.loads((study.root / "out" / "metrics.json").read_text())["per_class"]
    for text in (
        f"# vit-classifier version {version.version}\n",
        f"Study `{NAME}`",
        f"train {sizes['train']}, val {sizes['val']}, test {sizes['test']} images",
        f"seed {SEED}",
        f"mlflow models serve -m models:/vit-classifier/{version.version} --env-manager local",
        "Not calibrated: temperature 1.",
        "--smoke study",
        *(f"| {name} | {scores['support']} | {scores['sensitivity']:.4f} |" for name, scores in per_class.items()),
    ):
        assert text in card, text

    tags = {
        "test_acc": f"{run.data.metrics['test_acc']:.4f}",
        "classes": ",".join(sorted(CLASSES)),
        "num_classes": str(len(CLASSES)),
        "img_size": str(SMOKE.img_size),
        "model": MODEL,
        "temperature": "1.0000",
        "study": NAME,
    }
    assert {key: value for key, value in version.tags.items() if key != "checklist"} == tags  # test_the_checklist_...
    (output,) = run.outputs.model_outputs
    assert tags.items() <= study.client.get_logged_model(output.model_id).tags.items()
    assert MODEL_CARD_FILE in study.first.stdout  # listed among the results


def test_the_checklist_is_in_the_results_on_the_run_and_among_the_registered_version_s_files(study, tmp_path):
    import mlflow
    from search.final_model.checklist import CHECKLIST_FILE, CHECKLIST_TAG

    run = first_final(study)
    (version,) = [
        v for v in study.client.search_model_versions("name = 'vit-classifier'") if v.run_id == run.info.run_id
    ]
    checklist = (study.root / "out" / CHECKLIST_FILE).read_text()
    assert read_artifact(study.client, run.info.run_id, CHECKLIST_FILE) == checklist
    mlflow.set_tracking_uri(study.uri)
    shipped = mlflow.artifacts.download_artifacts(
        f"models:/vit-classifier/{version.version}/{CHECKLIST_FILE}", dst_path=str(tmp_path)
    )
    assert Path(shipped).read_text() == checklist  # among the version's model files
    assert version.tags[CHECKLIST_TAG].endswith(
        f"open: {CHECKLIST_FILE} in the model's files and on run {run.info.run_id}"
    )

    sizes = {split: len(study.split.splits[split]) for split in ("train", "val", "test")}
    parent = study_parent(study.client)
    for text in (
        f"# Reporting checklist: vit-classifier version {version.version}",
        f"| all | {sizes['train']} | {sizes['val']} | {sizes['test']} |",
        "(split_by: stratified)",
        # the study's leakage check, read from the study's run
        f"No exact, near-duplicate or mirrored copies of an image across train, val and test (the study's leakage "
        f"check, on run `{parent.info.run_id}`)",
        "Not calibrated (temperature 1)",
    ):
        assert text in checklist, text
    for topic in ("Results per subgroup", "External test", "Operating point (decision threshold)"):
        assert f"| {topic} |" in checklist and f"- [ ] **{topic}**" in checklist  # open: no flag asked for it
    keys = [sample.key for split in study.split.splits.values() for sample in split]
    assert not [key for key in keys if key in checklist]  # counts only, no image named


@pytest.mark.slow
def test_export_onnx_writes_a_model_onnx_checked_against_pytorch_and_logs_it(study, tmp_path):
    import onnxruntime

    config = study.root / "ray_results" / NAME / "best" / "best_config.yaml"
    out = tmp_path / "out"
    start = time.perf_counter()
    result = run_script(
        "final.py", "--config", str(config), "--no-pretrained", "--export", "onnx", "--out", str(out), cwd=study.root
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    print(f"\nfinal.py --export onnx on the smoke study: {time.perf_counter() - start:.1f} s")
    tested = len(study.split.splits["test"])
    assert re.search(
        rf"Exported model.onnx: matches PyTorch on {tested} test images, .* % of the tolerance \(1% of the probability "
        r"\+ 1e-06\)",
        result.stdout,
    )
    assert f"ONNX:       {out / 'model.onnx'}" in result.stdout
    run_id = json.loads((out / "metrics.json").read_text())["mlflow"]["run_id"]
    assert "model.onnx" in {a.path for a in study.client.list_artifacts(run_id)}
    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    images = np.random.default_rng(0).random((3, 3, SMOKE.img_size, SMOKE.img_size), dtype=np.float32)
    (probabilities,) = session.run(None, {"images": images})
    assert probabilities.shape == (3, len(CLASSES)) and np.allclose(probabilities.sum(axis=1), 1, atol=1e-5)


def test_test_split_is_disjoint_from_train_and_val_and_the_search_never_read_it(study):
    splits = json.loads((study.root / "out" / "splits.json").read_text())
    test, seen = set(splits["test"]), set(splits["train"]) | set(splits["val"])
    # The same split as the study (source, seed, smoke subsample), disjoint by file identity and content.
    assert test == {s.key for s in study.split.splits["test"]}
    assert splits["train"] == [s.key for s in study.split.splits["train"]]
    files = {key: (study.images / key).resolve() for key in test | seen}
    assert not test & seen
    assert not {files[k] for k in test} & {files[k] for k in seen}
    digest = {key: hashlib.sha256(files[key].read_bytes()).hexdigest() for key in files}
    assert not {digest[k] for k in test} & {digest[k] for k in seen}
    assert {files[k] for k in test} <= study.test_files  # the files that were unreadable during the search

    # The search decoded only train and val (no skipped images: it never met an unreadable test file) ...
    parent = study_parent(study.client)
    assert "skipped_images" not in parent.data.metrics and parent.data.params.get("skipped_images", "0") == "0"
    assert sorted(name.split("-")[0] for name in study.search_cache) == ["train", "val"]
    rows = sum(study.search_cache.values())
    assert rows == int(parent.data.params["train_images"]) + int(parent.data.params["val_images"]) == len(seen)
    # ... and the final run tested on all of it.
    assert first_final(study).data.params["test_images"] == str(len(test))


def test_the_study_config_is_written_once_and_read_back_by_its_one_loader(study):
    from search.records.study_config import StudyConfig

    parent = study_parent(study.client)
    on_run = study.client.download_artifacts(parent.info.run_id, "study.yaml", str(study.root))
    beside_trials = (study.root / "ray_results" / NAME / "study.yaml").read_text()
    assert Path(on_run).read_text() == beside_trials
    config = StudyConfig.from_yaml(beside_trials, "study.yaml")
    assert (config.name, config.model, config.data, config.smoke, config.seed) == (
        NAME,
        MODEL,
        str(study.images),
        True,
        SEED,
    )
    assert config.gpus_per_trial == 0.0 and config.max_concurrent >= 1  # the resolved share, never 'auto'
    # The parent run's params show the same values (for people and the UI); nothing reads them back.
    assert parent.data.params["trials"] == str(config.trials) and parent.data.params["data"] == config.data


@pytest.fixture
def one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(before)


def retrain_in_process(study, *flags: str):
    from search.final import build_parser, load_winner, retrain_request
    from search.final_model.retrain import prepare_final, train

    config = study.root / "ray_results" / NAME / "best" / "best_config.yaml"
    args = build_parser().parse_args(
        ["--config", str(config), "--no-pretrained", "--cache-dir", str(study.root / ".cache" / "images"), *flags]
    )
    prepared = prepare_final(retrain_request(args), load_winner(args))
    epochs = []
    learner, trained_epochs = train(prepared, on_epoch=epochs.append)
    return prepared, learner, trained_epochs, epochs


def test_the_same_config_and_seed_give_the_same_test_metrics(study, one_thread):
    """Retrain again (in this process, from the config file the study wrote): the logged test metrics, exactly."""
    from search.final_model.retrain import evaluate_once

    prepared, learner, _, _ = retrain_in_process(study)
    again = evaluate_once(prepared, learner)
    first = json.loads((study.root / "out" / "metrics.json").read_text())
    assert again.metrics == first["test"] and again.per_class == first["per_class"]
    assert again.confusion.tolist() == first["confusion_matrix"]


def test_keep_val_trains_on_train_and_keeps_the_best_val_epoch(study, one_thread, tmp_path, monkeypatch):
    prepared, learner, trained_epochs, epochs = retrain_in_process(study, "--keep-val", "--epochs", "2")
    assert len(prepared.train) == len(study.split.splits["train"]) and len(prepared.val) == len(
        study.split.splits["val"]
    )
    assert prepared.settings.train_on == "train" and 1 <= len(epochs) <= 2
    scores = [r.metrics["val_acc"] for r in epochs]
    assert trained_epochs == 1 + scores.index(max(scores))  # the best val epoch's weights, not the last

    # Then the temperature is fitted on val's logits, never the test's, and model.pt keeps it.
    from dataclasses import replace

    from search.evaluation import calibration
    from search.final_model.retrain import evaluate_once, write_results
    from trainables.checkpoint import ModelFile

    fitted_on, fit = [], calibration.fit_temperature
    monkeypatch.setattr(calibration, "fit_temperature", lambda *arrays: fitted_on.append(arrays) or fit(*arrays))
    result = evaluate_once(prepared, learner)
    ((logits, labels),) = fitted_on
    assert len(logits) == len(prepared.val) and labels is prepared.val.labels
    assert result.calibration.split == prepared.settings.calibration_split == "val"
    assert result.calibration.temperature == fit(logits, labels) and len(result.labels) == len(prepared.test)
    final = replace(prepared, out=tmp_path / "out")
    write_results(final, learner.model.to("cpu").eval(), result)
    assert ModelFile.load(final.out / "model.pt").temperature == result.calibration.temperature


def test_a_trial_run_gives_the_config_the_study_logged(study):
    from search.final_model.sources import load_run

    parent = study_parent(study.client)
    best_trial = parent.data.tags["best_trial_id"]
    (child,) = [r for r in runs_of(study.client, NAME) if r.data.tags.get("ray_trial_id") == best_trial]
    from_trial = load_run(study.uri, child.info.run_id, None)
    best = yaml.safe_load((study.root / "ray_results" / NAME / "best" / "best_config.yaml").read_text())
    assert from_trial.hyperparameters.to_dict() == best["hyperparameters"]
    assert from_trial.classes == best["classes"] and from_trial.split.data == best["data"] and from_trial.split.smoke
    assert from_trial.best_value == pytest.approx(best["best_value"])
    # Named alike, and retrained alike: the best epoch is the last that reached the best score, Ray's checkpoint.
    assert from_trial.trial == best["trial"] == child.data.tags["trial"] == parent.data.tags["best_trial"]
    assert from_trial.best_epoch == best["best_epoch"]


# ---------------------------------------------------------------- which trial, by its name


def test_the_winner_is_named_as_the_study_named_it_in_its_record_the_run_and_the_card(study):
    """t07, not Ray's id: best_config.yaml, final.py's first line, the final run's description and tags, the card."""
    from search.final_model.card import MODEL_CARD_FILE

    best = yaml.safe_load((study.root / "ray_results" / NAME / "best" / "best_config.yaml").read_text())
    (winner,) = [r for r in runs_of(study.client, NAME) if r.data.tags.get("ray_trial_id") == best["trial_id"]]
    label = winner.data.tags["trial"]
    assert re.fullmatch(r"t\d\d", label) and best["trial"] == label
    assert list(best)[:3] == ["study", "trial", "trial_id"]
    run = first_final(study)
    header = study.first.stdout.splitlines()[0]
    assert header.startswith(f"Final retrain of study {NAME} (trial {label}): vit on train+val"), header
    assert run.data.tags["mlflow.note.content"] == header.removesuffix(" Smoke config: the study subsample.")
    assert (run.data.tags["best_trial"], run.data.tags["best_trial_id"]) == (label, best["trial_id"])
    card = (study.root / "out" / MODEL_CARD_FILE).read_text()
    assert f"- Study `{NAME}`, trial {label}." in card and best["trial_id"] not in card + header


def test_a_best_config_without_the_trials_name_still_loads_and_says_whose_id_it_has(study, tmp_path):
    from search.records.winner import WinnerRefused, load_file

    older = yaml.safe_load((study.root / "ray_results" / NAME / "best" / "best_config.yaml").read_text())
    del older["trial"]  # as a study wrote it before the name was recorded
    trial_id = older["trial_id"]
    (tmp_path / "older.yaml").write_text(yaml.safe_dump(older))
    config = load_file(str(tmp_path / "older.yaml"), None)
    assert config.trial is None and config.trial_name == f"{trial_id} (Ray's trial id)"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({**older, "trial": 7}))
    with pytest.raises(
        WinnerRefused, match=r"trial must be a trial's name as its study printed it, e\.g\. t07, not 7$"
    ):
        load_file(str(tmp_path / "bad.yaml"), None)


def test_mlflow_s_registration_lines_are_not_shown(study, tmp_path, capsys):
    """final.py's own "Model: registered as ..." line says it; MLflow's lines, on a new name and an existing one,
    stay hidden, while anything else on stderr still shows."""
    from mlflow.tracking import MlflowClient

    import mlflow
    from search.final_model.registry import REGISTRY_LINES, lines_hidden, log_model
    from trainables.checkpoint import ModelFile
    from trainables.config import Hyperparameters
    from trainables.models import build_model
    from trainables.spec import ModelSpec

    output = study.first.stdout + study.first.stderr
    assert "registered as vit-classifier version" in study.first.stdout
    assert not [line for line in output.splitlines() if line.startswith(REGISTRY_LINES)]

    uri, before = f"sqlite:///{tmp_path}/registry.db", mlflow.get_tracking_uri()
    client = MlflowClient(uri)
    experiment = client.create_experiment("tiny", artifact_location=(tmp_path / "artifacts").as_uri())
    spec = ModelSpec("vit", 2, 32, pretrained=False, vit_depth=1)  # the smallest model of this project
    ModelFile(build_model(spec).state_dict(), spec, Hyperparameters(), ["a", "b"], {}).save(tmp_path / "model.pt")
    client.create_registered_model("tiny-classifier")  # a name that exists (final.py's first run made a new one)
    try:
        run_id = client.create_run(experiment).info.run_id
        registered = log_model(tmp_path / "model.pt", uri, run_id, "tiny-classifier")
    finally:
        mlflow.set_tracking_uri(before)
    assert registered.version == 1
    with lines_hidden(REGISTRY_LINES):
        print("warning: still shown", file=sys.stderr)
        print("Registered model 'x' already exists. Creating a new version of this model...", file=sys.stderr)
    err = capsys.readouterr().err
    assert not [line for line in err.splitlines() if line.startswith(REGISTRY_LINES)], err
    assert "warning: still shown\n" in err


# ---------------------------------------------------------------- refusals


def another_models_config(study, tmp_path: Path) -> str:
    best = yaml.safe_load((study.root / "ray_results" / NAME / "best" / "best_config.yaml").read_text())
    best["model"] = "cnn"  # model_spec still says vit
    (tmp_path / "mixed.yaml").write_text(yaml.safe_dump(best))
    return str(tmp_path / "mixed.yaml")


def study_without_a_completed_trial(tmp_path: Path) -> str:
    """What a study leaves when every trial fails: a FAILED parent, failed children, no best config."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/failed.db"
    client = MlflowClient(uri)
    experiment = client.create_experiment(MODEL, artifact_location=(tmp_path / "artifacts").as_uri())
    parent = client.create_run(experiment, run_name="broken", tags={"study": "broken", "model": MODEL}).info.run_id
    for _ in range(2):
        child = client.create_run(
            experiment, tags={"mlflow.parentRunId": parent, "study": "broken", "trial_status": "failed"}
        )
        client.set_terminated(child.info.run_id, "FAILED")
    client.set_terminated(parent, "FAILED")
    return uri


def edited_config(study, tmp_path: Path, **changes) -> str:
    """The study's best_config.yaml with some values replaced (hyperparameters.NAME for a hyperparameter)."""
    config = yaml.safe_load((study.root / "ray_results" / NAME / "best" / "best_config.yaml").read_text())
    for key, value in changes.items():
        if key.startswith("hp_"):
            config["hyperparameters"][key.removeprefix("hp_")] = value
        else:
            config[key] = value
    path = tmp_path / "edited.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


REFUSALS = {
    "missing study": (lambda s, t: ["--study", "nope"], "no study named 'nope'"),
    "missing store": (
        lambda s, t: ["--study", NAME, "--tracking-uri", f"sqlite:///{t}/none/mlflow.db"],
        "no MLflow store at",
    ),
    "no completed trial": (
        lambda s, t: ["--study", "broken", "--tracking-uri", study_without_a_completed_trial(t)],
        "study 'broken' has no completed trial (2 failed)",
    ),
    "config for another model": (
        lambda s, t: ["--config", str(s.root / "ray_results" / NAME / "best" / "best_config.yaml"), "--model", "cnn"],
        "it is a config for --model vit, not --model cnn",
    ),
    "config mixing two models": (lambda s, t: ["--config", another_models_config(s, t)], "model_spec is for model vit"),
    "infinite learning rate": (
        lambda s, t: ["--config", edited_config(s, t, hp_lr=float("inf"))],
        "lr=inf is not a finite number",
    ),
    "NaN dropout": (
        lambda s, t: ["--config", edited_config(s, t, hp_dropout=float("nan"))],
        "dropout=nan is not a finite number",
    ),
    "infinite batch size": (
        lambda s, t: ["--config", edited_config(s, t, hp_batch_size=float("inf"))],
        "batch_size=inf",
    ),
    "best value not a number": (
        lambda s, t: ["--config", edited_config(s, t, best_value="abc")],
        "best_value must be a finite number",
    ),
    "unknown tracking scheme": (
        lambda s, t: ["--study", NAME, "--tracking-uri", "foo://bar"],
        "not a store MLflow opens",
    ),
    "tracking server not answering": (
        lambda s, t: ["--study", NAME, "--tracking-uri", "http://127.0.0.1:1"],
        "no MLflow server answers",
    ),
    "data with other classes": (
        lambda s, t: [
            "--config",
            str(s.root / "ray_results" / NAME / "best" / "best_config.yaml"),
            "--data",
            "synthetic:4",
        ],
        "has other classes than",
    ),
}


@pytest.mark.parametrize("case", REFUSALS, ids=list(REFUSALS))
def test_bad_input_is_one_line_exit_2_and_nothing_written(study, tmp_path, case, monkeypatch, capsys):
    """final.py's main() in this process; test_a_refusal_is_one_line_... runs one as a user does."""
    from search.final import main

    make_args, message = REFUSALS[case]
    args = make_args(study, tmp_path)
    before = len(runs_of(study.client, NAME)), len(study.client.search_model_versions("name = 'vit-classifier'"))
    # The later --tracking-uri wins: argparse keeps the last value given.
    flags = ("--no-pretrained", "--tracking-uri", study.uri, *args, "--out", str(tmp_path / "out"))
    answer = call_main(main, *flags, cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert message in one_line_refusal(answer, "final.py")
    after = len(runs_of(study.client, NAME)), len(study.client.search_model_versions("name = 'vit-classifier'"))
    assert after == before and not (tmp_path / "out").exists()
    assert not (tmp_path / "none").exists()  # reading a missing store does not create one


def test_a_refusal_is_one_line_on_stderr_exit_2_without_a_traceback_from_the_command_line(study, tmp_path):
    """The contract as a user meets it, final.py in its own process: a study the store does not hold."""
    result = run_script(
        "final.py", "--no-pretrained", "--tracking-uri", study.uri, "--study", "nope", "--out", "out", cwd=tmp_path
    )
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("search/final.py: error: "), result.stderr
    assert "no study named 'nope'" in lines[0] and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_help_and_a_bad_config_answer_before_torch_mlflow_or_ray_load(study, tmp_path):
    """At once: before the imports that take seconds (a timing said so once; a busy machine made it flaky)."""
    config = another_models_config(study, tmp_path)
    assert heavy_modules_loaded("search.final", tmp_path, ["--help"], ["--config", config]) == [(0, []), (2, [])]


def test_help_names_every_flag(tmp_path, monkeypatch, capsys):
    from search.final import main

    result = call_main(main, "--help", cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert result.code == 0
    for flag in (
        "--study",
        "--run-id",
        "--config",
        "--model",
        "--epochs",
        "--keep-val",
        "--seed",
        "--no-pretrained",
        "--weights",
        "--data",
        "--cache-dir",
        "--tracking-uri",
        "--register-name",
        "--out",
        "--export",
        "--positive",
        "--operating-point",
        "--external",
        "--registered",
        "--ensemble",
        "--tta",
    ):
        assert flag in result.out
    assert "sqlite:///mlflow/mlflow.db" in result.out


# ---------------------------------------------------------------- the metrics themselves


def test_metrics_come_from_scikit_learn_and_ece_bins_confidence():
    from search.evaluation.calibration import expected_calibration_error
    from search.final_model.report import evaluate_test

    labels = np.array([0, 0, 1, 1, 2, 2])
    logits = np.log(
        np.array([[0.8, 0.1, 0.1], [0.6, 0.3, 0.1], [0.1, 0.7, 0.2], [0.5, 0.4, 0.1], [0.1, 0.1, 0.8], [0.2, 0.2, 0.6]])
    )
    result = evaluate_test(logits, labels, ["a", "b", "c"])
    assert result.metrics["test_acc"] == pytest.approx(5 / 6)
    assert result.per_class["b"] == {
        "precision": 1.0,
        "recall": 0.5,
        "f1": pytest.approx(2 / 3),
        "support": 2,
        "sensitivity": 0.5,
        "specificity": 1.0,
    }
    assert result.confusion.tolist() == [[2, 0, 0], [1, 1, 0], [0, 0, 2]]
    # Confidences .8 .6 .7 .5 .8 .6, correct but for .5: bins (.533,.6] {.6,.6}, (.667,.733] {.7},
    # (.733,.8] {.8,.8}, (.467,.533] {.5 wrong}: ECE = (2*.4 + .3 + 2*.2 + .5) / 6.
    assert result.metrics["test_ece"] == pytest.approx((2 * 0.4 + 0.3 + 2 * 0.2 + 0.5) / 6)
    confident = np.eye(3)[labels]
    assert expected_calibration_error(labels, confident) == 0.0


def test_the_registered_model_divides_the_logits_by_the_temperature_before_the_softmax():
    import torch

    from trainables.scoring import CalibratedSoftmax

    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.4, 3.0]])
    assert torch.allclose(CalibratedSoftmax(2.0)(logits), torch.softmax(logits / 2, dim=1))
    assert torch.equal(CalibratedSoftmax(1.0)(logits), torch.softmax(logits, dim=1))
