"""final.py --operating-point: the threshold rule on arrays, the flag's refusals, model.pt, predict.py's flagged
column, and one retrain end to end.

The rule is checked against a brute force over every candidate threshold; the end-to-end
run retrains a 32 px ViT on three synthetic classes from a winner's record written here
(no study to run), as final.py --config repeats a study's best configuration.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from helpers.cli import call_main, heavy_modules_loaded, one_line_refusal

from search.evaluation.intervals import RESAMPLES, stratified_resamples
from search.evaluation.operating_point import (
    NoImagesToChooseOn,
    choose_threshold,
    operating_point,
    rate_intervals,
    rates,
    rates_record,
    split_rates,
    threshold_for_sensitivity,
    threshold_for_specificity,
)
from search.records.operating_point import OperatingTarget, parse_operating_point

# ---------------------------------------------------------------- the rule, on arrays


def candidates(scores: np.ndarray) -> np.ndarray:
    """Every threshold that splits the scores differently: each score, and the least float above each."""
    return np.unique(np.concatenate([scores, np.nextafter(scores, np.inf), [0.0]]))


def test_sensitivity_takes_the_highest_threshold_that_flags_enough_positives():
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.75, 0.65])
    positives = np.array([True, True, True, True, True, False, False])
    threshold = threshold_for_sensitivity(scores, positives, 0.6)
    assert threshold == 0.7  # the 3rd highest positive: 3 of 5 flagged
    assert rates(scores, positives, threshold) == {"sensitivity": 0.6, "specificity": 0.5}
    assert rates(scores, positives, np.nextafter(threshold, 1))["sensitivity"] < 0.6  # any higher flags too few


def test_sensitivity_ties_are_flagged_together_and_only_raise_it():
    scores = np.array([0.9, 0.8, 0.8, 0.2])
    positives = np.ones(4, dtype=bool)
    threshold = threshold_for_sensitivity(scores, positives, 0.5)
    assert threshold == 0.8 and rates(scores, positives, threshold)["sensitivity"] == 0.75


def test_a_share_that_is_exact_in_counts_is_not_lost_to_rounding():
    """0.95 of 20 positives is 19 images, though 0.95 * 20 is 19.000000000000004 in floats."""
    scores = np.linspace(0.05, 1.0, 20)
    threshold = threshold_for_sensitivity(scores, np.ones(20, dtype=bool), 0.95)
    assert threshold == scores[1] and rates(scores, np.ones(20, dtype=bool), threshold)["sensitivity"] == 0.95


def test_specificity_takes_the_lowest_threshold_that_leaves_enough_others_unflagged():
    scores = np.array([0.1, 0.3, 0.3, 0.7, 0.9])
    positives = np.array([False, False, False, False, True])
    threshold = threshold_for_specificity(scores, positives, 0.5)
    assert 0.3 < threshold < 0.31  # just above the tied 0.3s: they and 0.1 stay unflagged
    assert rates(scores, positives, threshold) == {"sensitivity": 1.0, "specificity": 0.75}
    assert rates(scores, positives, 0.3)["specificity"] == 0.25  # at 0.3 itself the ties are flagged


def test_all_scores_alike_give_a_threshold_that_still_meets_the_target():
    """Every image at probability 1 (a saturated softmax): a sensitivity flags them all; a specificity flags none."""
    ones = np.ones(6)
    positives = np.array([True, True, True, False, False, False])
    assert threshold_for_sensitivity(ones, positives, 0.9) == 1.0
    assert rates(ones, positives, 1.0) == {"sensitivity": 1.0, "specificity": 0.0}
    threshold = threshold_for_specificity(ones, positives, 0.9)
    assert threshold > 1.0 and rates(ones, positives, threshold) == {"sensitivity": 0.0, "specificity": 1.0}


@pytest.mark.parametrize("target", ["sensitivity", "specificity"])
def test_the_rule_is_the_extreme_threshold_a_brute_force_finds(target):
    rng = np.random.default_rng(7)
    for _ in range(200):
        size = int(rng.integers(2, 30))
        scores = np.round(rng.random(size), 1)  # rounded: many ties
        positives = rng.random(size) < 0.4
        positives[0], positives[1] = True, False
        value = float(rng.uniform(0.05, 0.99))
        chosen = choose_threshold(scores, positives, target, value)
        meeting = [t for t in candidates(scores) if rates(scores, positives, t)[target] >= value]
        assert rates(scores, positives, chosen)[target] >= value
        # No candidate beyond it meets the target: a different split of the images would have to.
        best = max(meeting) if target == "sensitivity" else min(meeting)
        assert rates(scores, positives, chosen) == rates(scores, positives, best)
        assert (chosen >= best) if target == "sensitivity" else (chosen <= best)


def test_a_val_split_without_the_images_the_target_counts_is_refused():
    scores = np.array([0.2, 0.4])
    with pytest.raises(NoImagesToChooseOn, match="no image of the positive class"):
        threshold_for_sensitivity(scores, np.array([False, False]), 0.9)
    with pytest.raises(NoImagesToChooseOn, match="no image outside the positive class"):
        threshold_for_specificity(scores, np.array([True, True]), 0.9)
    # Only positives: a sensitivity can be chosen; the specificity is undefined, NaN.
    assert np.isnan(
        rates(scores, np.array([True, True]), threshold_for_sensitivity(scores, np.ones(2, bool), 0.9))["specificity"]
    )


def test_the_test_rates_get_intervals_from_the_evaluation_s_stratified_resamples():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], 40)
    probabilities = rng.dirichlet(np.ones(3), size=len(labels))
    probabilities[labels == 1, 1] += 0.5
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    resamples = stratified_resamples(labels, RESAMPLES, 0)
    intervals = rate_intervals(probabilities[:, 1], labels == 1, 0.4, resamples)
    for interval in intervals.values():
        assert interval.low <= interval.value <= interval.high and interval.high - interval.low > 0
    # Without a positive on the test split the sensitivity is undefined: NaN, with no interval.
    empty = rate_intervals(probabilities[:, 1], np.zeros(len(labels), bool), 0.4, resamples)
    assert np.isnan(empty["sensitivity"].value) and np.isnan(empty["sensitivity"].low)


def test_the_record_has_the_agreed_shape_and_the_threshold_comes_from_val_only():
    rng = np.random.default_rng(1)
    val_labels, test_labels = np.repeat([0, 1], 30), np.repeat([0, 1], 50)
    val = rng.dirichlet(np.ones(2), size=60)
    test = rng.dirichlet(np.ones(2), size=100)
    point = operating_point(["no", "yes"], 1, "sensitivity", 0.9, (val, val_labels), (test, test_labels), seed=0)
    assert point.threshold == threshold_for_sensitivity(val[:, 1], val_labels == 1, 0.9)
    assert point.val["sensitivity"] >= 0.9
    record = json.loads(json.dumps(point.record()))
    assert set(record) == {"positive", "target", "target_value", "threshold", "chosen_on", "val", "test"}
    assert record["positive"] == "yes" and record["chosen_on"] == "val" and record["target"] == "sensitivity"
    assert set(record["val"]) == {"sensitivity", "specificity"}
    assert set(record["test"]["specificity"]) == {"value", "low", "high"}
    assert {"op_threshold", "op_test_sensitivity", "op_test_sensitivity_ci_low", "op_test_specificity_ci_high"} <= set(
        point.metrics()
    )
    assert point.model_record() == {"positive": "yes", "threshold": point.threshold, "target": "sensitivity",
                                    "target_value": 0.9}  # fmt: skip
    # The test split never moves the threshold: other test images, the same threshold.
    again = operating_point(["no", "yes"], 1, "sensitivity", 0.9, (val, val_labels), (test[::-1], test_labels), 0)
    assert again.threshold == point.threshold


# ---------------------------------------------------------------- the flag


def test_the_flag_parses_targets_between_0_and_1():
    assert parse_operating_point("sensitivity=0.95") == OperatingTarget("sensitivity", 0.95)
    assert parse_operating_point(" Specificity = 0.9") == OperatingTarget("specificity", 0.9)
    assert str(OperatingTarget("specificity", 0.9)) == "specificity=0.9"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("sensitivity", "write sensitivity=VALUE or specificity=VALUE"),
        ("recall=0.9", "write sensitivity=VALUE or specificity=VALUE"),
        ("sensitivity=high", "high is not a number"),
        ("sensitivity=0", "strictly between 0 and 1"),
        ("specificity=1", "strictly between 0 and 1"),
        ("specificity=95", "strictly between 0 and 1"),
        ("sensitivity=nan", "strictly between 0 and 1"),
    ],
)
def test_a_bad_operating_point_is_one_line_exit_2_before_anything_loads(text, message, tmp_path, monkeypatch, capsys):
    from search.final import main

    answer = call_main(main, "--config", "x.yaml", "--operating-point", text, "--positive", "a", cwd=tmp_path,
                       monkeypatch=monkeypatch, capsys=capsys)  # fmt: skip
    assert message in one_line_refusal(answer, "final.py") and f"--operating-point {text}" in answer.err


def test_an_operating_point_needs_a_positive_class(tmp_path, monkeypatch, capsys):
    from search.final import main

    answer = call_main(main, "--config", "x.yaml", "--operating-point", "sensitivity=0.9", cwd=tmp_path,
                       monkeypatch=monkeypatch, capsys=capsys)  # fmt: skip
    assert "needs --positive CLASS" in one_line_refusal(answer, "final.py")


def test_the_refusals_come_before_torch_or_mlflow_load(tmp_path):
    calls = (["--config", "x.yaml", "--operating-point", "sensitivity=2", "--positive", "a"],)
    assert heavy_modules_loaded("search.final", tmp_path, *calls) == [(2, [])]


def winner_file(tmp_path: Path) -> Path:
    """A 32 px ViT's winner on three synthetic classes (a --smoke study's subsample), as final.py --config reads."""
    from dataclasses import replace

    from helpers.winners import a_winner

    from search.records.split import SplitSpec

    winner = replace(
        a_winner(),
        model="vit",
        classes=["class_00", "class_01", "class_02"],
        split=SplitSpec("synthetic:3", 0),
        img_size=32,
        pretrained=False,
        best_epoch=1,
        epochs=1,
    )
    path = tmp_path / "best_config.yaml"
    path.write_text(winner.to_yaml())
    return path


def test_an_unknown_positive_class_is_one_line_naming_the_classes(tmp_path, monkeypatch, capsys):
    from search.final import main

    config = winner_file(tmp_path)
    answer = call_main(main, "--config", str(config), "--positive", "class_09", "--operating-point",
                       "sensitivity=0.9", "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", "--cache-dir",
                       str(tmp_path / "cache"), "--out", str(tmp_path / "out"), cwd=tmp_path, monkeypatch=monkeypatch,
                       capsys=capsys)  # fmt: skip
    line = one_line_refusal(answer, "final.py")
    assert "--positive class_09" in line and "class_00, class_01, class_02" in line
    assert not (tmp_path / "out").exists()


def test_a_val_split_without_the_counted_images_is_refused_before_training():
    from search.errors import UsageError
    from search.final_model.retrain import check_operating_point
    from search.records.retrain import RetrainRequest
    from trainables.data import CachedSplit

    val = CachedSplit("unused.npy", np.array([0, 0, 2, 2]))
    request = RetrainRequest(tracking_uri="", cache_dir="", keep_val=True,
                             operating_point=OperatingTarget("sensitivity", 0.9))  # fmt: skip
    with pytest.raises(UsageError, match="val split has no image of class b"):
        check_operating_point(request, 1, ["a", "b", "c"], val)
    check_operating_point(request, 2, ["a", "b", "c"], val)  # class c is there
    only_b = CachedSplit("unused.npy", np.array([1, 1]))
    specificity = RetrainRequest(tracking_uri="", cache_dir="", keep_val=True,
                                 operating_point=OperatingTarget("specificity", 0.9))  # fmt: skip
    with pytest.raises(UsageError, match="no image outside b"):
        check_operating_point(specificity, 1, ["a", "b", "c"], only_b)


# ---------------------------------------------------------------- model.pt and predict.py


def tiny_model_file(path: Path, operating_point: dict | None):
    import torch

    from trainables.checkpoint import ModelFile
    from trainables.config import Hyperparameters
    from trainables.models import build_model
    from trainables.spec import ModelSpec

    torch.manual_seed(0)
    spec = ModelSpec("vit", 3, 32, pretrained=False)
    model = ModelFile(build_model(spec).state_dict(), spec, Hyperparameters(), ["a", "b", "c"], {},
                      temperature=2.0, operating_point=operating_point)  # fmt: skip
    model.save(path)
    return model


def test_model_file_keeps_the_operating_point_and_files_without_one_still_load(tmp_path):
    import torch

    from trainables.checkpoint import ModelFile

    point = {"positive": "b", "threshold": 0.3125, "target": "sensitivity", "target_value": 0.95}
    tiny_model_file(tmp_path / "with.pt", point)
    assert ModelFile.load(tmp_path / "with.pt").operating_point == point
    tiny_model_file(tmp_path / "without.pt", None)
    assert "operating_point" not in torch.load(tmp_path / "without.pt", weights_only=True)  # as files were before
    assert ModelFile.load(tmp_path / "without.pt").operating_point is None


def read_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as stream:
        reader = csv.DictReader(stream)
        return list(reader.fieldnames or []), list(reader)


def test_predict_writes_a_flagged_column_that_follows_the_threshold(tmp_path, monkeypatch, capsys):
    from helpers import write_image_folder

    from search.predict import main

    images = write_image_folder(tmp_path / "images", {"x": 4, "y": 4}, size=32)
    # A threshold between the probabilities the model gives, so that some images are flagged and some not.
    tiny_model_file(tmp_path / "plain.pt", None)
    answer = call_main(main, "--model", str(tmp_path / "plain.pt"), "--images", str(images), "--out",
                       str(tmp_path / "plain.csv"), "--device", "cpu", cwd=tmp_path, monkeypatch=monkeypatch,
                       capsys=capsys)  # fmt: skip
    assert answer.code == 0, answer.err
    columns, rows = read_rows(tmp_path / "plain.csv")
    assert "flagged" not in columns and "Flagged" not in answer.out  # no operating point: the CSV as before
    scores = sorted(float(row["p:b"]) for row in rows)
    threshold = (scores[3] + scores[4]) / 2

    point = {"positive": "b", "threshold": threshold, "target": "specificity", "target_value": 0.9}
    tiny_model_file(tmp_path / "model.pt", point)
    answer = call_main(main, "--model", str(tmp_path / "model.pt"), "--images", str(images), "--out",
                       str(tmp_path / "flagged.csv"), "--device", "cpu", cwd=tmp_path, monkeypatch=monkeypatch,
                       capsys=capsys)  # fmt: skip
    assert answer.code == 0, answer.err
    columns, flagged_rows = read_rows(tmp_path / "flagged.csv")
    assert columns[-1] == "flagged" and columns[:-1] == ["image", "prediction", "probability", "p:a", "p:b", "p:c"]
    assert [row["flagged"] for row in flagged_rows] == [str(int(float(row["p:b"]) >= threshold)) for row in rows]
    assert sum(row["flagged"] == "1" for row in flagged_rows) == 4
    assert f"p(b) >= {threshold:.4f}" in answer.out and "Flagged:  4 of 8 images as b" in answer.out


def test_a_model_file_whose_operating_point_names_no_class_is_refused(tmp_path, monkeypatch, capsys):
    from helpers import write_image_folder

    from search.predict import main

    images = write_image_folder(tmp_path / "images", {"x": 1}, size=32)
    tiny_model_file(tmp_path / "model.pt", {"positive": "z", "threshold": 0.5, "target": "sensitivity",
                                            "target_value": 0.9})  # fmt: skip
    answer = call_main(main, "--model", str(tmp_path / "model.pt"), "--images", str(images), "--out",
                       str(tmp_path / "p.csv"), "--device", "cpu", cwd=tmp_path, monkeypatch=monkeypatch,
                       capsys=capsys)  # fmt: skip
    assert "operating point flags 'z'" in one_line_refusal(answer, "predict.py")


# ---------------------------------------------------------------- end to end


@pytest.mark.slow
def test_final_py_chooses_the_threshold_on_val_reports_it_on_test_and_predict_applies_it(tmp_path, monkeypatch, capsys):
    import torch
    from mlflow.tracking import MlflowClient

    from search.final import main
    from search.final_model import retrain
    from search.predict import main as predict_main
    from trainables.checkpoint import ModelFile

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    seen = []  # what the operating point is chosen on (val) and measured on (test)
    monkeypatch.setattr(retrain, "operating_point", lambda *args, **kw: seen.append((kw["val"], kw["test"])) or
                        operating_point(*args, **kw))  # fmt: skip
    try:
        config, uri, out = winner_file(tmp_path), f"sqlite:///{tmp_path}/mlflow/mlflow.db", tmp_path / "out"
        answer = call_main(main, "--config", str(config), "--no-pretrained", "--epochs", "1", "--positive",
                           "class_01", "--operating-point", "sensitivity=0.8", "--tracking-uri", uri, "--cache-dir",
                           str(tmp_path / "cache"), "--out", str(out), cwd=tmp_path, monkeypatch=monkeypatch,
                           capsys=capsys)  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    assert answer.code == 0, answer.out[-3000:] + answer.err[-3000:]
    assert "note: --operating-point implies --keep-val" in answer.out
    assert (
        "Operating point: flag p(class_01) >= " in answer.out and "chosen on val for sensitivity >= 0.8" in answer.out
    )

    metrics = json.loads((out / "metrics.json").read_text())
    point = metrics["operating_point"]
    assert metrics["settings"]["train_on"] == "train" and metrics["calibration"]["split"] == "val"
    assert point["positive"] == "class_01" and point["chosen_on"] == "val" and point["val"]["sensitivity"] >= 0.8
    # The threshold is val's rule on val's calibrated probabilities; the test's only report on it.
    ((val, test),) = seen
    assert point["threshold"] == threshold_for_sensitivity(val[0][:, 1], val[1] == 1, 0.8)
    assert point["test"] == json.loads(json.dumps(rates_record(split_rates(*test, 1, point["threshold"], 0))))
    predictions = list(csv.DictReader((out / "test_predictions.csv").open()))
    assert np.allclose(test[0][:, 1], [float(row["p:class_01"]) for row in predictions], rtol=1e-7, atol=1e-12)
    model = ModelFile.load(out / "model.pt")
    assert model.operating_point == {"positive": "class_01", "threshold": point["threshold"],
                                     "target": "sensitivity", "target_value": 0.8}  # fmt: skip

    client = MlflowClient(uri)
    run = client.get_run(metrics["mlflow"]["run_id"])
    assert run.data.metrics["op_threshold"] == pytest.approx(point["threshold"])
    assert {"op_test_sensitivity", "op_test_specificity_ci_low", "op_val_sensitivity"} <= set(run.data.metrics)
    assert run.data.params["op_positive"] == "class_01" and run.data.params["op_target"] == "sensitivity"
    version = client.get_model_version(metrics["mlflow"]["name"], metrics["mlflow"]["version"])
    assert version.tags["operating_point.positive"] == "class_01"
    assert float(version.tags["operating_point.threshold"]) == point["threshold"]
    assert version.tags["operating_point.target"] == "sensitivity=0.8"
    card = (out / "model_card.md").read_text()
    assert "## Operating point" in card and "p(class_01) >= " in card

    # predict.py on the registered version applies the same threshold.
    images = tmp_path / "new"
    from helpers import write_image_folder

    write_image_folder(images, {"x": 3}, size=32)
    uri_of_version = f"models:/{metrics['mlflow']['name']}/{metrics['mlflow']['version']}"
    answer = call_main(predict_main, "--model", uri_of_version, "--images", str(images), "--out",
                       str(tmp_path / "p.csv"), "--tracking-uri", uri, "--device", "cpu", cwd=tmp_path,
                       monkeypatch=monkeypatch, capsys=capsys)  # fmt: skip
    assert answer.code == 0, answer.err
    _, rows = read_rows(tmp_path / "p.csv")
    assert {row["flagged"] for row in rows} <= {"0", "1"} and "flagged" in rows[0]
    for row in rows:  # where the CSV's 6 digits are far enough from the threshold to tell which side
        score = float(row["p:class_01"])
        if abs(score - point["threshold"]) > 1e-5:
            assert row["flagged"] == str(int(score >= point["threshold"]))
