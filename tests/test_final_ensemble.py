"""final.py --ensemble K and --tta: the members chosen, the refusals, the judgement, and one whole run.

The selection and the sentences are pure and tested on records made here; one end-to-end run (slow) retrains
an ensemble of 2 with test-time flips from a tiny study and reads back what it wrote, registered and serves.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from helpers import run_script
from helpers.cli import call_main, one_line_refusal
from helpers.smoke_study import laid_out_like_the_project, run_in

from search.errors import UsageError
from search.evaluation.calibration import calibrate
from search.evaluation.intervals import Interval
from search.evaluation.paired import PairedTest
from search.final_model.ensemble import (
    Judged,
    MemberScore,
    Outcome,
    SearchedTrial,
    averaged_result,
    choose_members,
    judgement,
    ranked_distinct,
    trained_flips,
)
from search.final_model.report import evaluate_test
from trainables.config import SEED

KNOBS_A = {"lr": 0.001, "dropout": 0.1}
KNOBS_B = {"lr": 0.003, "dropout": 0.2}
KNOBS_C = {"lr": 0.01, "dropout": 0.3}


def trial(label: str, score: float | None, knobs: dict, status: str = "completed", mean: float | None = None):
    return SearchedTrial(label, f"run-{label}", status, score, knobs, mean)


# ---------------------------------------------------------------- which members


def test_the_k_best_distinct_completed_configurations_best_first():
    trials = [
        trial("t00", 0.80, KNOBS_A),
        trial("t01", 0.95, KNOBS_B, status="pruned"),  # an early score is no final one
        trial("t02", 0.90, KNOBS_C),
        trial("t03", 0.85, {**KNOBS_C, SEED: 7}),  # the same configuration as t02 (the seed aside): counts once
        trial("t04", 0.99, KNOBS_B, status="failed"),
        trial("t05", 0.70, KNOBS_B),
    ]
    chosen = choose_members(trials, 3, "max", "s")
    assert [t.label for t in chosen] == ["t02", "t00", "t05"]
    with pytest.raises(UsageError, match=r"--ensemble 4: study 's' has 3 distinct configuration\(s\)"):
        choose_members(trials, 4, "max", "s")


def test_a_minimised_metric_ranks_the_lowest_first_and_the_winner_leads():
    trials = [trial("t00", 0.3, KNOBS_A), trial("t01", 0.1, KNOBS_B), trial("t02", 0.2, KNOBS_C)]
    assert [t.label for t in ranked_distinct(trials, "min")] == ["t01", "t02", "t00"]
    # The study's winner is what final.py alone retrains: it is always the first member.
    assert [t.label for t in ranked_distinct(trials, "min", first="t02")] == ["t02", "t01", "t00"]


def test_a_confirmation_ranks_its_candidates_by_their_mean_before_the_rest():
    trials = [
        trial("t00", 0.95, KNOBS_A, mean=0.80),  # best search score, worse over seeds
        trial("t01", 0.90, KNOBS_B, mean=0.88),
        trial("t02", 0.93, KNOBS_C),  # not confirmed: after the confirmed ones
    ]
    assert [t.label for t in ranked_distinct(trials, "max", first="t01")] == ["t01", "t00", "t02"]


def test_too_few_distinct_configurations_for_an_ensemble_says_so():
    trials = [trial("t00", 0.9, KNOBS_A), trial("t01", 0.8, dict(KNOBS_A))]
    with pytest.raises(UsageError, match=r"has 1 distinct configuration\(s\).*an ensemble needs 2"):
        choose_members(trials, 2, "max", "s")


def test_tta_uses_the_flips_the_winner_trained_with():
    assert trained_flips({"hflip": 0.5, "vflip": 0.0}) == ("hflip",)
    assert trained_flips({"hflip": 0.5, "vflip": 0.2}) == ("hflip", "vflip")
    assert trained_flips({"hflip": 0.0, "vflip": 0.0}) == ()


def test_tta_without_a_trained_flip_is_left_off_with_a_one_line_note(capsys):
    from types import SimpleNamespace

    from search.final import build_parser, test_time_flips

    winner = SimpleNamespace(hyperparameters=SimpleNamespace(to_dict=lambda: {"hflip": 0.0, "vflip": 0.0}))
    winner.trial_or_id = "t04"
    args = build_parser().parse_args(["--study", "s", "--tta"])
    assert test_time_flips(args, winner) == ()
    (note,) = capsys.readouterr().out.splitlines()
    assert note.startswith("note: --tta changes nothing: t04 trained with hflip = vflip = 0")


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--study", "s", "--ensemble", "1"], "--ensemble 1: an ensemble has at least 2 members"),
        (["--config", "best_config.yaml", "--ensemble", "3"], "give --study NAME, not --config"),
        (["--run-id", "abc", "--ensemble", "2"], "give --study NAME, not --run-id"),
        (["--study", "s", "--trial", "t03", "--ensemble", "2"], "give --study NAME, not --trial"),
        (["--study", "s", "--tta", "--external", "synthetic"], "--tta with --external: not supported"),
        (["--registered", "m/1", "--external", "synthetic", "--ensemble", "2"], "--ensemble: a retrain's flag"),
    ],
)
def test_refusals_are_one_line_exit_2_before_anything_is_written(args, expected, tmp_path, monkeypatch, capsys):
    from search.final import main

    answer = call_main(main, *args, cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert expected in one_line_refusal(answer, "final.py")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- judged


def pair(difference: float, low: float, high: float, p: float) -> PairedTest:
    return PairedTest("ensemble", "t07", Interval(difference, low, high), p, a_only=9, b_only=2)


def test_the_judgement_sentence_says_significantly_better_or_not_different():
    better = judgement("The ensemble of 3", "t07 alone", pair(0.021, 0.004, 0.039, 0.012))
    assert better == (
        "The ensemble of 3 is significantly better than t07 alone: +2.1 points (95 % CI [0.4, 3.9]), McNemar p = 0.012."
    )
    same = judgement("The ensemble of 3", "t07 alone", pair(-0.004, -0.02, 0.012, 0.61))
    assert same.startswith("The ensemble of 3 is not significantly different from t07 alone: -0.4 points")
    worse = judgement("t07 with test-time hflip", "without", pair(-0.03, -0.05, -0.01, 0.002))
    assert worse.startswith("t07 with test-time hflip is significantly worse than without: -3.0 points")


def test_the_records_have_the_shared_shapes():
    interval = Interval(0.9, 0.85, 0.95)
    members = tuple(
        MemberScore(label, rank, 0.9, interval, Interval(0.05, 0.03, 0.07), 1.2, 4, 3, {"lr": 0.001})
        for rank, label in enumerate(("t07", "t03"), start=1)
    )
    judged = Judged(pair(0.02, 0.0, 0.04, 0.2), "sentence")
    outcome = Outcome(members, ("hflip",), "val_acc", interval, judged, judged)
    record = outcome.record()
    assert record["ensemble"]["k"] == 2 and record["ensemble"]["best_member"] == "t07"
    assert record["ensemble"]["members"][1]["config_rank"] == 2
    assert record["ensemble"]["members"][0]["test_acc_ci"] == [0.85, 0.95]
    assert set(record["ensemble"]["vs_best_member"]) == {"difference", "ci", "p_value", "significant", "sentence"}
    assert record["ensemble"]["forward_passes"] == record["tta"]["forward_passes"] == 4
    assert record["tta"]["flips"] == ["hflip"] and record["tta"]["vs_without"]["sentence"] == "sentence"
    metrics = outcome.metrics()
    for key in ("ensemble_members", "ensemble_vs_best_difference", "ensemble_vs_best_p_value", "tta_forward_passes"):
        assert key in metrics
    assert metrics["member_t03_test_acc"] == 0.9
    assert "| t03 | 2 | 0.9000 | 90.0 % |" in outcome.card_section()


def test_one_member_without_flips_scores_as_final_py_scores_one_model():
    """The averaged path (log-probabilities at temperature 1) gives a single model's numbers exactly."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 20)
    logits = rng.normal(size=(60, 3)) + 2 * np.eye(3)[labels]
    val_labels = np.repeat(np.arange(3), 10)
    val = (rng.normal(size=(30, 3)) + 2 * np.eye(3)[val_labels], val_labels)
    single = evaluate_test(logits, labels, ["a", "b", "c"], val=val)
    calibration = calibrate((logits, labels), fit_on=val)
    averaged = averaged_result([logits[None]], [calibration], 1, labels, ["a", "b", "c"])
    np.testing.assert_allclose(averaged.probabilities, single.probabilities, rtol=1e-9)
    for key in ("test_acc", "test_loss", "test_ece", "test_roc_auc"):
        assert averaged.metrics[key] == pytest.approx(single.metrics[key], rel=1e-9, abs=1e-12)
    assert averaged.calibration.ece_before == pytest.approx(single.calibration.ece_before)


def test_the_ensemble_temperature_is_fitted_on_val_s_average_never_the_test_s():
    """Val's average is under-confident (two members that agree, each right), the test's over-confident (two that
    agree, often wrong): fitted on val T_ens sharpens (< 1), fitted on the test it would soften (> 1)."""
    from search.evaluation.calibration import expected_calibration_error, fit_temperature
    from search.final_model.ensemble import log_probabilities, member_calibration
    from trainables.scoring import averaged_probabilities

    rng = np.random.default_rng(3)
    classes = ["a", "b", "c"]
    val_labels, labels = np.repeat(np.arange(3), 40), np.repeat(np.arange(3), 40)
    val_signal = 6 * np.eye(3)[val_labels]
    wrong = np.eye(3)[(labels + rng.integers(1, 3, size=len(labels))) % 3]
    test_signal = 3 * np.where(rng.random(len(labels))[:, None] < 0.35, wrong, np.eye(3)[labels])
    # Views (1, N, C) per member; members disagree on val's noise, so their average is blunter than each.
    val = [(val_signal + rng.normal(scale=3, size=(120, 3)))[None] for _ in range(2)]
    test = [(test_signal + rng.normal(scale=0.3, size=(120, 3)))[None] for _ in range(2)]
    calibrations = [member_calibration(v[0], val_labels, t[0], labels) for v, t in zip(val, test, strict=True)]
    temperatures = [calibration.temperature for calibration in calibrations]

    result = averaged_result(test, calibrations, 1, labels, classes, (val, val_labels))

    on_val = fit_temperature(log_probabilities(averaged_probabilities(val, temperatures)), val_labels)
    on_test = fit_temperature(log_probabilities(averaged_probabilities(test, temperatures)), labels)
    assert result.calibration.temperature == pytest.approx(on_val) and abs(on_val - on_test) > 0.1
    assert result.calibration.averaged == 2 and result.calibration.split == "val"
    shipped = averaged_probabilities(test, temperatures, on_val)  # what the model file's scoring network gives
    np.testing.assert_allclose(result.probabilities, shipped, rtol=1e-6)
    assert result.metrics["test_ece"] == pytest.approx(expected_calibration_error(labels, shipped), rel=1e-6)
    before = averaged_probabilities(test, temperatures)  # the calibrated members averaged, T_ens = 1
    assert result.calibration.ece_before == pytest.approx(expected_calibration_error(labels, before))
    # Without --keep-val there is nothing to fit on: T_ens = 1, the average as it is.
    unfitted = averaged_result(test, calibrations, 1, labels, classes)
    assert unfitted.calibration.temperature == 1.0
    np.testing.assert_allclose(unfitted.probabilities, before, rtol=1e-9)


# ---------------------------------------------------------------- one whole run


@pytest.fixture(scope="module")
def ensemble_run(tmp_path_factory):
    """A tiny study (3 trials of 1 epoch: all complete), then final.py --ensemble 2 --tta --keep-val on it."""
    root = laid_out_like_the_project(tmp_path_factory.mktemp("ensemble"))
    study, _ = run_in(
        root,
        *("--model", "vit", "--smoke", "--data", "synthetic:3", "--no-pretrained", "--gpus-per-trial", "0"),
        *("--trials", "3", "--epochs", "1", "--img-size", "32", "--name", "ens", "--seed", "0"),
    )
    assert study.returncode == 0, study.stdout[-3000:] + study.stderr[-3000:]
    env = {"OMP_NUM_THREADS": "1"}
    final = run_script(
        "final.py",
        *("--study", "ens", "--ensemble", "2", "--tta", "--keep-val", "--no-pretrained", "--out", "out"),
        cwd=root,
        env=env,
    )
    assert final.returncode == 0, final.stdout[-3000:] + final.stderr[-3000:]
    return root, final


@pytest.mark.slow
def test_an_ensemble_with_flips_is_one_model_file_judged_carded_and_served(ensemble_run, tmp_path):
    from trainables.checkpoint import ModelFile
    from trainables.models import build_model
    from trainables.scoring import averaged_probabilities

    root, final = ensemble_run
    out = root / "out"
    record = json.loads((out / "metrics.json").read_text())
    ensemble, tta = record["ensemble"], record["tta"]
    assert ensemble["k"] == 2 and [m["config_rank"] for m in ensemble["members"]] == [1, 2]
    labels = [m["label"] for m in ensemble["members"]]
    assert ensemble["best_member"] == labels[0]
    assert ensemble["vs_best_member"]["sentence"].startswith("The ensemble of 2 is ")
    assert tta["flips"] == ["hflip"] and tta["forward_passes"] == ensemble["forward_passes"] == 4
    assert ensemble["vs_best_member"]["sentence"] in final.stdout and "4 forward passes per image" in final.stdout

    model_file = ModelFile.load(out / "model.pt")
    assert [member.label for member in model_file.members] == labels and model_file.tta == ("hflip",)
    temperatures = [member.temperature for member in model_file.members]
    assert temperatures == pytest.approx([m["temperature"] for m in ensemble["members"]])
    # T_ens, fitted on val's average (--keep-val), is the file's and the report's.
    ensemble_temperature = model_file.ensemble_temperature
    assert ensemble_temperature == pytest.approx(record["calibration"]["temperature"]) and ensemble_temperature != 1
    assert f"T_ens = {ensemble_temperature:.3f} fitted on val" in final.stdout

    card = (out / "model_card.md").read_text()
    assert "## Ensemble and test-time augmentation" in card and ensemble["vs_best_member"]["sentence"] in card
    assert all(f"| {label} | {rank} |" in card for rank, label in enumerate(labels, start=1))

    # predict.py on the registered version: the members' calibrated probabilities, averaged over the flips.
    images = tmp_path / "images"
    images.mkdir()
    from PIL import Image

    pixels = np.random.default_rng(1).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    for i, image in enumerate(pixels):
        Image.fromarray(image).save(images / f"i{i}.png")
    predicted = run_script(
        "predict.py", "--model", "models:/vit-classifier/1", "--images", str(images), "--out", "p.csv", cwd=root
    )
    assert predicted.returncode == 0, predicted.stdout[-2000:] + predicted.stderr[-2000:]
    with open(root / "p.csv") as file:
        rows = sorted(csv.DictReader(file), key=lambda row: row["image"])
    served = np.array([[float(row[f"p:class_0{c}"]) for c in range(3)] for row in rows])
    batch = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div(255)
    logits = []
    for member in model_file.members:
        network = build_model(member.spec)
        network.load_state_dict(member.weights)
        with torch.no_grad():
            logits.append([network.eval()(view).numpy() for view in (batch, batch.flip(-1))])
    np.testing.assert_allclose(served, averaged_probabilities(logits, temperatures, ensemble_temperature), atol=1e-4)


@pytest.mark.slow
def test_more_members_than_the_study_has_is_refused_before_anything_is_written(ensemble_run, monkeypatch, capsys):
    from search.final import main

    root, _ = ensemble_run
    answer = call_main(
        main,
        "--study",
        "ens",
        "--ensemble",
        "9",
        "--no-pretrained",
        "--out",
        "out9",
        cwd=root,
        monkeypatch=monkeypatch,
        capsys=capsys,
    )
    assert "--ensemble 9: study 'ens' has 3 distinct configuration(s)" in one_line_refusal(answer, "final.py")
    assert not (root / "out9").exists()
