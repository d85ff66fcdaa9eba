"""final.py --external DATA (another site's images, tested whole as the test split is) and --registered NAME/VERSION
(a registered model tested later): indexing a source whole, the refusals, the record, and both end to end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import ROOT, run_script, write_image_folder
from helpers.cli import call_main, one_line_refusal
from helpers.smoke_study import laid_out_like_the_project, run_in

from search.errors import UsageError
from trainables.data import EXTERNAL, CachedSplit, DatasetIndex, Sample, data_digest, index_source, one_split

FIXTURE_CONFIG = ROOT / "tests" / "fixtures" / "best_config_v1.yaml"
"""A cnn config of a smoke study on synthetic:3 at 32 px: its classes are class_00, class_01, class_02."""
METRIC_KEYS = ("acc", "balanced_acc", "macro_f1", "roc_auc", "ece", "loss")
CLASSES = ["class_00", "class_01", "class_02"]


# ---------------------------------------------------------------- indexing a source whole


def test_one_split_holds_every_sample_of_the_source_in_key_order_whatever_the_seed():
    split = index_source("synthetic:3", seed=0)
    whole = one_split(split)
    assert list(whole.splits) == [EXTERNAL] and whole.split_by == "whole"
    keys = [sample.key for sample in whole.splits[EXTERNAL]]
    assert sorted(keys) == keys and len(keys) == sum(len(samples) for samples in split.splits.values()) == 180
    assert keys == [sample.key for sample in one_split(index_source("synthetic:3", seed=7)).splits[EXTERNAL]]
    assert data_digest(whole) == data_digest(one_split(index_source("synthetic:3", seed=7)))
    assert data_digest(whole) != data_digest(one_split(index_source("synthetic:4", seed=0)))


def test_a_folder_with_fewer_classes_is_tested_with_its_labels_as_the_model_s_columns(tmp_path):
    from search.final_model.external import prepare_external

    folder = write_image_folder(tmp_path / "site", {"class_00": 4, "class_02": 5}, size=16)
    external = prepare_external(str(folder), CLASSES, 16, tmp_path / "cache")
    assert external.missing == ("class_01",) and external.index.classes == CLASSES
    labels = external.index.labels(EXTERNAL)
    assert sorted(labels.tolist()) == [0] * 4 + [2] * 5  # class_02 is the model's column 2, not the source's 1
    assert external.images.images().shape == (9, 16, 16, 3)


REFUSED = {
    "a missing folder": (lambda t: str(t / "nowhere"), "--external", "does not exist"),
    "a class the model lacks": (
        lambda t: str(write_image_folder(t / "site", {"class_00": 3, "other": 3}, size=16)),
        "class(es) the model was not trained on (other)",
        "class_00, class_01, class_02",
    ),
    "one class only": (
        lambda t: str(write_image_folder(t / "site", {"class_00": 3}, size=16)),
        "--external",
        "holds one class",
    ),
}


@pytest.mark.parametrize("case", REFUSED, ids=list(REFUSED))
def test_external_data_that_cannot_be_tested_is_refused_in_one_line(tmp_path, case):
    from search.final_model.external import prepare_external

    make, *expected = REFUSED[case]
    with pytest.raises(UsageError) as refused:
        prepare_external(make(tmp_path), CLASSES, 16, tmp_path / "cache")
    message = str(refused.value)
    assert "\n" not in message and all(part in message for part in expected), message


def test_final_py_refuses_bad_external_data_before_training_or_writing(tmp_path, monkeypatch, capsys):
    from search.final import main

    site = write_image_folder(tmp_path / "site", {"class_00": 3, "tumour": 3}, size=16)
    common = ("--config", str(FIXTURE_CONFIG), "--no-pretrained", "--cache-dir", str(tmp_path / "cache"))
    where = ("--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", "--out", str(tmp_path / "out"))
    answer = call_main(
        main, *common, *where, "--external", str(site), cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys
    )
    assert "not trained on (tumour)" in one_line_refusal(answer, "final.py")
    assert not (tmp_path / "out").exists() and not (tmp_path / "mlflow.db").exists()


REGISTERED_REFUSALS = {
    "without --external": (["--registered", "cnn-classifier/1"], "give --external DATA"),
    "a malformed name": (["--registered", "cnn-classifier", "--external", "synthetic:3"], "write NAME/VERSION"),
    "a retrain's flags": (
        ["--registered", "cnn-classifier/1", "--external", "synthetic:3", "--epochs", "2", "--keep-val"],
        "--epochs, --keep-val: a retrain's flag(s)",
    ),
    "no store": (["--registered", "cnn-classifier/1", "--external", "synthetic:3"], "no MLflow store at"),
}


@pytest.mark.parametrize("case", REGISTERED_REFUSALS, ids=list(REGISTERED_REFUSALS))
def test_registered_refusals_are_one_line_exit_2(tmp_path, case, monkeypatch, capsys):
    from search.final import main

    args, expected = REGISTERED_REFUSALS[case]
    where = ("--tracking-uri", f"sqlite:///{tmp_path}/none/mlflow.db", "--out", str(tmp_path / "out"))
    answer = call_main(main, *args, *where, cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert expected in one_line_refusal(answer, "final.py")
    assert not (tmp_path / "out").exists() and not (tmp_path / "none").exists()


# ---------------------------------------------------------------- the evaluation record


def tiny_external(tmp_path: Path, labels: np.ndarray):
    from search.final_model.external import ExternalSet

    samples = [Sample(f"c{label:02d}-{i:04d}", int(label)) for i, label in enumerate(labels)]
    index = DatasetIndex("synthetic:3", list(CLASSES), {EXTERNAL: samples}, split_by="whole")
    return ExternalSet(
        given="synthetic:3", index=index, images=CachedSplit(str(tmp_path / "x.npy"), labels), missing=()
    )


def test_the_external_record_has_the_agreed_shape_and_keeps_the_val_temperature(tmp_path):
    from search.final_model.external import evaluate_external
    from search.final_model.report import evaluate_test

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 20)
    logits = rng.normal(0, 1, (60, 3)) + 2.0 * np.eye(3)[labels]
    internal = evaluate_test(logits[::-1].copy(), labels[::-1].copy(), CLASSES)  # some other test split
    point = {"positive": "class_01", "threshold": 0.4, "target": "sensitivity", "target_value": 0.9}
    external = evaluate_external(
        tiny_external(tmp_path, labels), logits, labels, 1.7, internal=internal, operating_point=point
    )
    assert external.result.calibration.temperature == 1.7  # the val temperature, never refitted here
    record = json.loads(json.dumps(external.record()))
    assert record["source"] == "synthetic:3" and record["images"] == 60 and len(record["digest"]) == 20
    assert set(record["metrics"]) == set(METRIC_KEYS)
    assert set(record["intervals"]) == set(METRIC_KEYS) - {"loss"}
    assert record["metrics"]["acc"] == pytest.approx(float((logits.argmax(1) == labels).mean()))
    low, high = record["intervals"]["acc"]
    assert low <= record["metrics"]["acc"] <= high
    assert record["operating_point"]["positive"] == "class_01" and record["operating_point"]["threshold"] == 0.4
    assert set(record["operating_point"]["test"]) == {"sensitivity", "specificity"}
    assert set(record["operating_point"]["test"]["sensitivity"]) == {"value", "low", "high"}
    assert [row["metric"] for row in record["compared_with_test"]] == list(METRIC_KEYS)
    metrics = external.metrics()
    assert {"external_acc", "external_acc_ci_low", "external_acc_ci_high", "external_ece", "external_loss"} <= set(
        metrics
    )
    assert "external_op_sensitivity_ci_low" in metrics and metrics["external_images"] == 60


def test_a_drop_is_called_worse_only_where_the_external_interval_lies_wholly_below():
    from search.final_model.external import Difference

    assert Difference("acc", "accuracy", 0.90, 0.70, 0.62, 0.78).worse
    assert not Difference("acc", "accuracy", 0.90, 0.85, 0.78, 0.93).worse
    assert Difference("ece", "ECE", 0.02, 0.10, 0.06, 0.14).worse  # lower is better
    assert not Difference("loss", "loss", 0.3, 0.9, None, None).worse  # no interval, no verdict
    assert not Difference("roc_auc", "ROC-AUC", 0.9, float("nan"), float("nan"), float("nan")).worse
    assert not Difference("acc", "accuracy", None, 0.5, 0.4, 0.6).worse
    # A calibration error of 0.00018 against 0.00016: outside the interval, but printed as +0.0000: no drop.
    assert not Difference("ece", "ECE", 0.00016, 0.00018, 0.000172, 0.00025).worse


# ---------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def tested(tmp_path_factory):
    """A one-trial vit study on synthetic:3 at 32 px, retrained by final.py --external synthetic:3."""
    root = laid_out_like_the_project(tmp_path_factory.mktemp("external"))
    study = ("--model", "vit", "--smoke", "--data", "synthetic:3", "--no-pretrained", "--gpus-per-trial", "0")
    searched, _ = run_in(root, *study, "--trials", "1", "--epochs", "1", "--img-size", "32", "--name", "ext")
    assert searched.returncode == 0, searched.stdout[-3000:] + searched.stderr[-3000:]
    final = run_script("final.py", "--study", "ext", "--no-pretrained", "--external", "synthetic:3", "--out", "out",
                       cwd=root)  # fmt: skip
    assert final.returncode == 0, final.stdout[-3000:] + final.stderr[-3000:]
    return root, final


@pytest.mark.slow
def test_final_py_external_writes_metrics_json_the_run_s_metrics_and_the_card_section(tested):
    from mlflow.tracking import MlflowClient

    root, final = tested
    record = json.loads((root / "out" / "metrics.json").read_text())
    external = record["external"]
    assert external["source"] == "synthetic:3" and external["images"] == 180
    assert set(external["metrics"]) == set(METRIC_KEYS)
    assert external["calibration"]["temperature"] == record["calibration"]["temperature"]
    client = MlflowClient(f"sqlite:///{root}/mlflow/mlflow.db")
    run = client.get_run(record["mlflow"]["run_id"])
    assert run.data.metrics["external_acc"] == pytest.approx(external["metrics"]["acc"])
    assert run.data.metrics["external_acc_ci_low"] <= run.data.metrics["external_acc"]
    contexts = {tag.value for data in run.inputs.dataset_inputs for tag in data.tags}
    assert {"train and test", "external test"} <= contexts
    lines = (root / "out" / "external_predictions.csv").read_text().splitlines()
    assert len(lines) == 181
    card = (root / "out" / "model_card.md").read_text()
    assert "## External validation" in card and "180 images of another source (synthetic:3" in card
    assert "External test: 180 images of synthetic:3" in final.stdout
    version = client.get_model_version("vit-classifier", "1")
    assert f"external.{external['digest'][:12]}" in version.tags


@pytest.mark.slow
def test_a_registered_version_tested_later_gets_its_own_run_linked_to_the_version(tested, tmp_path):
    from mlflow.tracking import MlflowClient

    root, _ = tested
    site = write_image_folder(tmp_path / "site", {"class_00": 6, "class_02": 6}, size=40)
    later = run_script("final.py", "--registered", "vit-classifier/1", "--external", str(site), "--out", "later",
                       cwd=root)  # fmt: skip
    assert later.returncode == 0, later.stdout[-3000:] + later.stderr[-3000:]
    record = json.loads((root / "later" / "metrics.json").read_text())
    assert record["external"]["images"] == 12 and record["external"]["missing_classes"] == ["class_01"]
    client = MlflowClient(f"sqlite:///{root}/mlflow/mlflow.db")
    run = client.get_run(record["mlflow"]["run_id"])
    version = client.get_model_version("vit-classifier", "1")
    assert run.data.tags["role"] == "external" and run.data.tags["registered_model"] == "vit-classifier"
    assert run.data.tags["version"] == "1" and run.data.tags["source_run_id"] == version.run_id
    assert run.info.experiment_id == client.get_run(version.run_id).info.experiment_id
    assert "study" not in run.data.tags  # not taken for a study's run
    key = f"external.{record['external']['digest'][:12]}"
    assert version.tags[key].startswith(f"run {run.info.run_id}: accuracy ")
    assert run.data.metrics["external_acc"] == pytest.approx(record["external"]["metrics"]["acc"])
    unknown = run_script("final.py", "--registered", "vit-classifier/9", "--external", str(site), cwd=root)
    assert unknown.returncode == 2 and "has no version 9; its versions: 1" in unknown.stderr
    shutil.rmtree(root / "later")


def test_a_manifest_with_the_study_s_subgroup_columns_is_scored_per_subgroup_too(tmp_path):
    from search.final_model.external import evaluate_external, prepare_external

    folder = write_image_folder(tmp_path / "site", {"class_00": 6, "class_01": 6, "class_02": 6}, size=16)
    rows = [
        f"{path.relative_to(folder)},{path.parent.name},{'north' if i % 2 else 'south'}"
        for i, path in enumerate(sorted(folder.rglob("*.png")))
    ]
    manifest = folder / "manifest.csv"
    manifest.write_text("path,label,site\n" + "\n".join(rows) + "\n")
    external = prepare_external(str(manifest), CLASSES, 16, tmp_path / "cache", subgroups=("site", "sex"))
    assert external.subgroups == ("site",)  # the study's sex column is not in this site's manifest: left out
    labels = external.index.labels(EXTERNAL)
    logits = np.eye(3)[labels] * 3.0
    record = evaluate_external(external, logits, labels, 1.0).record()
    assert set(record["subgroups"]["columns"]["site"]) == {"north", "south"}
    assert record["subgroups"]["columns"]["site"]["north"]["images"] == 9


def test_a_registered_ensemble_or_model_with_flips_is_refused_not_scored_by_its_first_member():
    from types import SimpleNamespace

    from search.errors import UsageError
    from search.final_model.external import refuse_averaged

    refuse_averaged(SimpleNamespace(members=("m1",), tta=()), "m/1")  # a single model passes
    for model_file, what in (
        (SimpleNamespace(members=("m1", "m2", "m3"), tta=()), "an ensemble of 3"),
        (SimpleNamespace(members=("m1",), tta=("hflip",)), "a model with test-time hflip"),
    ):
        with pytest.raises(UsageError, match=f"m/1 is {what}: --registered --external tests single models"):
            refuse_averaged(model_file, "m/1")
