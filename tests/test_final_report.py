"""The final run's one test (final_model/report.py): calibrated metrics, the temperature's warnings, bootstrap
intervals and one-vs-rest rates, from arrays.

Synthetic logits with a known temperature: labels drawn from softmax(z), the "model"
outputs t·z, so the temperature that calibrates it is t.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers.scores import scaled_logits

from search.evaluation import calibration
from search.evaluation.calibration import calibrate, fit_temperature, softmax
from search.final_model.report import (
    INTERVAL_SEED,
    PER_CLASS_COLUMNS,
    calibration_lines,
    evaluate_test,
    held_out_record,
    logged_metrics,
    per_class_table,
    plot_reliability,
    summary_lines,
)

CLASSES = [f"class{c}" for c in range(5)]


# ---------------------------------------------------------------- the temperature


def test_a_temperature_fitted_on_few_images_or_at_a_bound_is_warned_about_and_a_steady_one_is_not():
    test = scaled_logits(2000, 2.0, seed=5)
    steady = calibrate(test, scaled_logits(2000, 2.0, seed=6))
    few = calibrate(test, scaled_logits(40, 2.0, seed=7))
    labels = np.arange(400) % 4
    all_right = calibrate(test, (10.0 * np.eye(4)[labels], labels))  # nothing to calibrate against: T only sharpens
    assert (steady.fitted_on, few.fitted_on, all_right.fitted_on) == (2000, 40, 400)
    assert not steady.unsteady and few.unsteady and all_right.unsteady
    assert not calibrate(test, None).unsteady  # nothing fitted, nothing to doubt
    assert len(calibration_lines(steady)) == 1
    assert "warning: the temperature was fitted on 40 val images: it may be far" in calibration_lines(few)[1]
    assert "fitted on 400 val images, every one classified right" in calibration_lines(all_right)[1]


def test_scaling_lowers_the_ece_and_nll_of_over_confident_logits_and_keeps_the_predictions():
    val = scaled_logits(1500, 3.0, seed=3)
    test_logits, test_labels = scaled_logits(1500, 3.0, seed=4)
    uncalibrated = evaluate_test(test_logits, test_labels, CLASSES)
    result = evaluate_test(test_logits, test_labels, CLASSES, val=val)
    found = result.calibration
    assert found.split == "val" and found.calibrated and found.temperature == pytest.approx(3.0, rel=0.15)
    assert found.ece_after < 0.5 * found.ece_before and found.nll_after < found.nll_before
    assert result.metrics["test_ece"] == found.ece_after and result.metrics["test_loss"] == found.nll_after
    np.testing.assert_array_equal(result.predictions, uncalibrated.predictions)
    np.testing.assert_array_equal(result.probabilities.argmax(axis=1), test_logits.argmax(axis=1))
    for key in ("test_acc", "test_balanced_acc", "test_macro_f1"):
        assert result.metrics[key] == uncalibrated.metrics[key], key
    np.testing.assert_allclose(result.probabilities, softmax(test_logits, found.temperature))


def test_only_the_val_arrays_reach_the_fit_never_the_test(monkeypatch):
    """Val and test made with different temperatures: the fitted one is val's, and the fit saw val's arrays only."""
    val_logits, val_labels = scaled_logits(1500, 2.0, seed=5)
    test_logits, test_labels = scaled_logits(1500, 4.0, seed=6)
    fitted_on = []

    def spy(logits, labels):
        fitted_on.append((logits, labels))
        return fit_temperature(logits, labels)

    monkeypatch.setattr(calibration, "fit_temperature", spy)
    result = evaluate_test(test_logits, test_labels, CLASSES, val=(val_logits, val_labels))
    ((logits, labels),) = fitted_on
    assert logits is val_logits and labels is val_labels
    assert result.calibration.temperature == pytest.approx(2.0, rel=0.15)  # not 4: the test's own


def test_without_a_val_split_nothing_is_fitted_and_before_equals_after(monkeypatch):
    monkeypatch.setattr(calibration, "fit_temperature", lambda *_: pytest.fail("fitted without a val split"))
    logits, labels = scaled_logits(500, 3.0, seed=7)
    found = evaluate_test(logits, labels, CLASSES).calibration
    assert (found.temperature, found.split, found.calibrated) == (1.0, None, False)
    assert found.ece_before == found.ece_after and found.nll_before == found.nll_after


# ---------------------------------------------------------------- the reliability diagram


def test_the_reliability_diagram_is_a_png(tmp_path):
    val = scaled_logits(500, 3.0, seed=10)
    found = calibrate(scaled_logits(500, 3.0, seed=11), fit_on=val)
    path = plot_reliability(found, tmp_path / "reliability.png", "test reliability")
    assert path.read_bytes()[:4] == b"\x89PNG"


# ---------------------------------------------------------------- intervals


def test_intervals_contain_the_test_score_and_narrow_with_more_images():
    logits, labels = scaled_logits(300, 1.0, seed=12)
    small = evaluate_test(logits, labels, CLASSES)
    big = evaluate_test(np.tile(logits, (4, 1)), np.tile(labels, 4), CLASSES)  # the same scores, 4x the images
    assert list(small.intervals) == ["test_acc", "test_balanced_acc", "test_macro_f1", "test_roc_auc", "test_ece"]
    for key, interval in small.intervals.items():
        assert interval.value == pytest.approx(small.metrics[key], abs=1e-12), key
        assert interval.low < interval.value < interval.high, key
        # the width shrinks like 1/sqrt(N): about half
        assert big.intervals[key].high - big.intervals[key].low < 0.7 * (interval.high - interval.low), key


def test_intervals_are_seeded_and_logged_with_their_bounds():
    logits, labels = scaled_logits(200, 1.0, seed=13)
    first, again = evaluate_test(logits, labels, CLASSES), evaluate_test(logits, labels, CLASSES)
    assert first.intervals == again.intervals
    logged = logged_metrics(first)
    assert logged["test_acc_ci_low"] == first.intervals["test_acc"].low
    assert logged["test_roc_auc_ci_high"] == first.intervals["test_roc_auc"].high
    assert {"temperature", "test_ece_uncalibrated", "test_loss_uncalibrated", *first.metrics} <= set(logged)
    record = held_out_record(first)
    assert record["intervals"]["resamples"] == 2000 and record["intervals"]["seed"] == INTERVAL_SEED
    assert record["intervals"]["test_acc"] == [first.intervals["test_acc"].low, first.intervals["test_acc"].high]
    assert record["calibration"]["temperature"] == 1.0 and record["calibration"]["split"] is None


# ---------------------------------------------------------------- sensitivity and specificity


def test_sensitivity_and_specificity_against_a_hand_counted_confusion_matrix():
    #            predicted a  b  c
    confusion = [[5, 1, 0], [2, 3, 1], [0, 0, 4]]  # rows: true a (6), b (6), c (4); 16 images
    labels = np.repeat([0, 0, 1, 1, 1, 2], [5, 1, 2, 3, 1, 4])
    predicted = np.repeat([0, 1, 0, 1, 2, 2], [5, 1, 2, 3, 1, 4])
    logits = 5.0 * np.eye(3)[predicted]
    result = evaluate_test(logits, labels, ["a", "b", "c"])
    assert result.confusion.tolist() == confusion
    # a: TP 5, FN 1, FP 2 (b called a), TN 16 - 5 - 1 - 2 = 8.  b: TP 3, FN 3, FP 1, TN 9.  c: TP 4, FN 0, FP 1, TN 11.
    expected = {"a": (5 / 6, 8 / 10), "b": (3 / 6, 9 / 10), "c": (4 / 4, 11 / 12)}
    for name, (sensitivity, specificity) in expected.items():
        scores = result.per_class[name]
        assert scores["sensitivity"] == pytest.approx(sensitivity) == scores["recall"], name
        assert scores["specificity"] == pytest.approx(specificity), name
    table = per_class_table(result)
    assert list(table) == ["class", *PER_CLASS_COLUMNS] and table["specificity"][1] == pytest.approx(0.9)
    assert "specificity" in result.report and "one-vs-rest" in result.report

    lines = "\n".join(summary_lines(result, "val_acc", None, 16))
    assert "lowest sensitivity  0.5000 (b)" in lines and "lowest specificity  0.8000 (a;" in lines
    assert f"accuracy            {12 / 16:.4f}  (95 % CI " in lines
    assert "2,000 resamples" in lines and "Calibration: none" in lines and "--keep-val" in lines


def test_an_averaged_calibration_names_each_network_s_temperature_not_the_average_s_1():
    from dataclasses import replace

    from search.evaluation.calibration import measured
    from search.final_model.report import calibration_lines

    logits = np.array([[2.0, 0.0], [0.0, 1.0], [1.0, 0.5], [0.2, 0.9]] * 5)
    labels = np.array([0, 1, 0, 1] * 5)
    one = measured((logits, labels), 1.0, split="val", fitted_on=1000, fitted_all_right=False)
    assert calibration_lines(one)[0].startswith("Calibration: temperature 1.000 fitted on val")
    (line,) = calibration_lines(replace(one, averaged=6))
    assert line.startswith("Calibration: 6 probabilities averaged (members x views), each calibrated by its network's")
    assert "temperature 1.000" not in line
    (line,) = calibration_lines(replace(one, averaged=6, temperature=0.8))  # the average's own, fitted on val
    assert "then the average by T_ens = 0.800 fitted on val" in line
    assert "(before: the calibrated networks averaged; after: with T_ens; predictions unchanged)" in line
