"""The reporting checklist, rendered from a record of plain facts: no model, no MLflow."""

from __future__ import annotations

import re

from search.final_model.card import CardFacts, ClassRow, Score
from search.final_model.checklist import CHECKLIST_FILE, checklist_items, checklist_markdown, checklist_tag
from search.tracking.study_run import StudyLeaks

CLASSES = ("benign", "malignant", "normal")
NO_LEAKS = StudyLeaks(
    "s42",
    {
        f"leak_{kind}_{pair}": 0
        for kind in ("exact", "near", "mirror")
        for pair in ("train_val", "train_test", "val_test")
    },
)


def facts(**changes) -> CardFacts:
    values = dict(
        title="cnn-classifier version 2",
        model_uri="models:/cnn-classifier/2",
        model="cnn",
        backbones=("tf_efficientnetv2_s",),
        img_size=224,
        classes=tuple(ClassRow(name, 10 + i, 0.8, 0.9) for i, name in enumerate(CLASSES)),
        temperature=1.4321,
        data_name="busi.csv",
        data_digest="abc123",
        split_sizes={"train": 63, "val": 15, "test": 33},
        split_method="stratified by class and grouped by patient (scikit-learn's StratifiedGroupKFold), seed 0",
        synthetic=False,
        smoke=False,
        study="busi-cnn",
        trial="t07",
        config_source="study busi-cnn",
        search_metric="val_acc",
        search_best=0.8512,
        run_id="r123",
        train_on="train",
        train_images=63,
        epochs=20,
        trained_epochs=14,
        seed=0,
        pretrained=True,
        hyperparameters={"lr": 0.00037861878865426044, "batch_size": 32, "class_weighting": "inverse"},
        test_images=33,
        scores=(Score("test_acc", "accuracy", 0.8205, 0.75, 0.8889),),
        interval_note="95 % intervals: percentile bootstrap, 2,000 resamples, seed 0",
        calibration_split="val",
        calibration_images=15,
        calibration_unsteady=False,
        ece_before=0.0912,
        ece_after=0.0311,
        split_by="patients",
        class_counts={
            "train": {"benign": 40, "malignant": 8, "normal": 15},
            "val": {"benign": 9, "malignant": 2, "normal": 4},
            "test": {"benign": 10, "malignant": 11, "normal": 12},
        },
        patients={"train": 30, "val": 7, "test": 9},
        manifest_digest="0123456789ab",
    )
    return CardFacts(**{**values, **changes})


def record(**optional) -> dict:
    """metrics.json as finish() writes it, with the optional keys given."""
    return {
        "test": {"test_loss": 0.44, "test_acc": 0.8205, "test_roc_auc": float("nan")},
        "intervals": {
            "confidence": 0.95,
            "method": "percentile bootstrap, resampled within each class",
            "resamples": 2000,
            "seed": 0,
            "test_acc": [0.75, 0.8889],
            "test_roc_auc": [float("nan"), float("nan")],
        },
        "calibration": {
            "temperature": 1.4321,
            "split": "val",
            "fitted_on_images": 15,
            "fitted_all_right": False,
            "ece_bins": 15,
            "ece_before": 0.0912,
            "ece_after": 0.0311,
            "nll_before": 0.5,
            "nll_after": 0.44,
        },
        "trained_epochs": 14,
        "settings": {"split_from": "study_record", "calibration_split": "val", "train_on": "train"},
        "mlflow": {"run_id": "r123"},
        **optional,
    }


def rate(value: float) -> dict:
    return {"value": value, "low": value - 0.1, "high": value + 0.05}


SUBGROUPS = {
    "positive": "malignant",
    "columns": {
        "site": {
            "A": {
                "images": 20,
                "metrics": {key: rate(0.9) for key in ("acc", "balanced_acc", "sensitivity", "specificity")},
                "below_overall": [],
            },
            "B": {
                "images": 13,
                "metrics": {key: rate(0.6) for key in ("acc", "balanced_acc", "sensitivity", "specificity")},
                "below_overall": ["acc"],
                "note": "too few images for an interval",
            },
        }
    },
}
OPERATING_POINT = {
    "positive": "malignant",
    "target": "sensitivity",
    "target_value": 0.95,
    "threshold": 0.1234,
    "chosen_on": "val",
    "val": {"sensitivity": 1.0, "specificity": 0.7},
    "test": {"sensitivity": rate(0.9091), "specificity": rate(0.7273)},
}
EXTERNAL = {
    "source": "/data/site-b",
    "digest": "feedbeef",
    "images": 50,
    "metrics": {"acc": 0.78, "balanced_acc": 0.7, "macro_f1": 0.69, "roc_auc": 0.88, "ece": 0.05, "loss": 0.6},
    "intervals": {"acc": [0.66, 0.88]},
    "operating_point": {"test": {"sensitivity": rate(0.85), "specificity": rate(0.6)}},
}


def statuses(text: str) -> dict[str, str]:
    """The summary table: item -> answered / open."""
    return dict(re.findall(r"^\| ([^|]+?) \| [^|]+ \| [^|]+ \| (answered|open) \|$", text, flags=re.MULTILINE))


def test_without_subgroups_external_or_operating_point_those_items_are_open_and_name_their_flag():
    text = checklist_markdown(facts(), record(), NO_LEAKS)
    status = statuses(text)
    for topic, flag in (
        ("Results per subgroup", "--subgroups"),
        ("External test", "--external DATA"),
        ("Operating point (decision threshold)", "--operating-point sensitivity=0.95 --positive CLASS"),
    ):
        assert status[topic] == "open"
        (line,) = [line for line in text.splitlines() if line.startswith(f"- [ ] **{topic}**")]
        assert flag in line
    for topic in (
        "Data source and digest",
        "Images per class and split",
        "How the split was made",
        "Leakage check across splits",
        "Model, its selection and hyperparameters",
        "Calibration",
        "Performance with confidence intervals",
        "The test split used once",
    ):
        assert status[topic] == "answered", topic


def test_with_subgroups_external_and_operating_point_they_are_answered_from_the_record():
    text = checklist_markdown(
        facts(), record(subgroups=SUBGROUPS, external=EXTERNAL, operating_point=OPERATING_POINT), NO_LEAKS
    )
    status = statuses(text)
    assert (
        status["Results per subgroup"]
        == status["External test"]
        == status["Operating point (decision threshold)"]
        == "answered"
    )
    assert "| B | 13 | 0.6000 (0.5000–0.6500) |" in text  # the subgroup's row, its interval
    assert "| acc | too few images for an interval |" in text  # its note
    assert "| acc |" in text.split("### External test")[1]
    assert "Source: /data/site-b, digest `feedbeef`, 50 images" in text
    assert "Threshold 0.1234 on the calibrated probability of class malignant, chosen on the val split" in text
    assert "sensitivity 0.9091 (0.8091–0.9591)" in text
    assert "the threshold on val" in text  # nothing chosen on the test


def test_the_record_s_facts_fill_the_answers():
    text = checklist_markdown(facts(), record(), NO_LEAKS)
    for expected in (
        "Data digest: `abc123`",
        "Manifest digest: `0123456789ab`",
        "| malignant | 8 | 2 | 11 |",
        "| all | 63 | 15 | 33 |",
        "Patients: train 30, val 7, test 9.",
        "by patient: each patient's images in one split",
        "split_by: patients",
        "the study's own split, image by image",
        "No exact, near-duplicate or mirrored copies",
        "the configuration of study busi-cnn, trial t07",
        "| lr | 0.0003786 |",
        "Largest to smallest class in the train split: 5.0:1. Class weighting in the loss: inverse",
        "Temperature 1.4321, fitted on the val split (15 images",
        "0.0912 before, 0.0311 after",
        "95 % intervals: percentile bootstrap, resampled within each class, 2,000 resamples, seed 0.",
        "| test_acc | 0.8205 | 0.7500–0.8889 |",
        "| test_roc_auc | n/a | n/a |",
        "evaluated it once",
    ):
        assert expected in text, expected


def test_an_uncalibrated_run_and_a_split_cut_again_say_so():
    uncalibrated = record()
    uncalibrated["calibration"] = {**uncalibrated["calibration"], "split": None, "temperature": 1.0}
    uncalibrated["settings"] = {"split_from": "seed", "calibration_split": "none"}
    text = checklist_markdown(facts(calibration_split=None), uncalibrated, NO_LEAKS)
    assert "Not calibrated (temperature 1)" in text
    assert "cut again with the study's seed" in text
    assert "Caution: the split was cut again" in text


def test_the_leakage_item_reports_pairs_or_points_to_the_study_run():
    leaky = StudyLeaks("s42", {**NO_LEAKS.counts, "leak_exact_train_test": 2, "leak_mirror_val_test": 1})
    found = checklist_markdown(facts(), record(), leaky)
    assert "train-test: 2 exact, 0 near, 0 mirror; val-test: 0 exact, 0 near, 1 mirror" in found
    unreachable = checklist_markdown(facts(), record(), None)
    assert statuses(unreachable)["Leakage check across splits"] == "open"
    assert "see the study run" in unreachable
    older = checklist_markdown(facts(), record(), StudyLeaks("s1", {}))
    assert "predates the leakage check: see the study run" in older


def test_items_only_the_user_can_answer_are_open_with_a_prompt_each():
    text = checklist_markdown(
        facts(), record(subgroups=SUBGROUPS, external=EXTERNAL, operating_point=OPERATING_POINT), NO_LEAKS
    )
    open_lines = [line for line in text.splitlines() if line.startswith("- [ ] ")]
    for topic in (
        "Intended use and users",
        "Reference standard and labelling",
        "Eligibility of patients",
        "Data collection: dates, sites, setting",
        "Sample size",
        "Missing data",
        "Ethics approval",
        "Fairness and health inequalities",
    ):
        (line,) = [line for line in open_lines if line.startswith(f"- [ ] **{topic}**")]
        guidelines, prompt = line.split("): ", 1)
        assert "CLAIM: " in guidelines and "TRIPOD+AI: " in guidelines and len(prompt) > 20, line
    items = checklist_items(facts(), record(), NO_LEAKS)
    answered = sum(item.answered for item in items)
    assert checklist_tag(facts(), record(), NO_LEAKS) == (
        f"{answered} answered, {len(items) - answered} open: {CHECKLIST_FILE} in the model's files and on run r123"
    )
