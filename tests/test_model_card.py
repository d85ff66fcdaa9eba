"""The model card and the registered version's tags, from a record of plain facts: no model, no MLflow."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from search.final_model.card import (
    CLASSES_TAG_LIMIT,
    DESCRIPTION_LIMIT,
    CardFacts,
    ClassRow,
    Score,
    card_markdown,
    card_tags,
    listed,
    split_method,
)
from trainables.data import DatasetIndex, Sample

SECTIONS = [
    "Intended use and limits",
    "Input and output",
    "Data",
    "Where it came from",
    "Training",
    "Test results",
    "Calibration",
    "Per class",
]


def facts(count: int = 3, **changes) -> CardFacts:
    names = ["benign", "malignant", "normal"] if count == 3 else [f"class-{i:04d}" for i in range(count)]
    values = dict(
        title="cnn-classifier version 2",
        model_uri="models:/cnn-classifier/2",
        model="cnn",
        backbones=("tf_efficientnetv2_s",),
        img_size=224,
        classes=tuple(ClassRow(name, 10 + i, 0.5 + 0.4 * i / count, 0.9) for i, name in enumerate(names)),
        temperature=1.4321,
        data_name="busi",
        data_digest="abc123",
        split_sizes={"train": 546, "val": 117, "test": 117},
        split_method="stratified by class, 70/15/15 % of each class's images, seed 0",
        synthetic=False,
        smoke=False,
        study="busi-cnn",
        trial="t07",
        config_source="study busi-cnn",
        search_metric="val_acc",
        search_best=0.8512,
        run_id="r123",
        train_on="train",
        train_images=546,
        epochs=20,
        trained_epochs=14,
        seed=0,
        pretrained=True,
        hyperparameters={"lr": 0.00037861878865426044, "batch_size": 32, "fusion": "two_tokens"},
        test_images=117,
        scores=(
            Score("test_acc", "accuracy", 0.8205, 0.75, 0.8889),
            Score("test_roc_auc", "ROC-AUC (OvR macro)", 0.93, float("nan"), float("nan")),
            Score("test_loss", "loss (NLL)", 0.4412),
        ),
        interval_note="95 % intervals: percentile bootstrap, 2,000 resamples, seed 0",
        calibration_split="val",
        calibration_images=400,
        calibration_unsteady=False,
        ece_before=0.0912,
        ece_after=0.0311,
    )
    return CardFacts(**{**values, **changes})


def test_the_card_has_every_section_in_order_and_states_the_record():
    card = card_markdown(facts())
    headings = re.findall(r"^## (.+)$", card, flags=re.MULTILINE)
    assert card.startswith("# cnn-classifier version 2\n") and headings == SECTIONS
    for text in (
        "not a medical device",
        "Trained on 546 images from one source (busi)",
        "other scanners, sites",
        "224×224",
        "float32 (N, 3, 224, 224)",
        "T = 1.4321",
        "mlflow models serve -m models:/cnn-classifier/2 --env-manager local",
        "`abc123`",
        "train 546, val 117, test 117 images",
        "seed 0",
        "Study `busi-cnn`, trial t07",
        "The trial's best val_acc in the search: 0.8512",
        "MLflow run `r123`",
        "Trained on the train split (546 images) for 20 epoch(s), the weights of epoch 14 (best on val) kept",
        "accuracy 0.8205 (95 % CI 0.7500–0.8889)",
        "| lr | 0.0003786 |",
        "| batch_size | 32 |",
        "| fusion | two_tokens |",
        "| accuracy | 0.8205 (0.7500–0.8889) |",
        "| ROC-AUC (OvR macro) | 0.9300 (n/a) |",
        "| loss (NLL) | 0.4412 |",
        "fitted on the val split",
        "0.0912 before, 0.0311 after",
        "| malignant | 11 | 0.6333 | 0.9000 |",
    ):
        assert text in card, text
    assert "synthetic" not in card and "--smoke" not in card and "not calibrated" not in card


def test_an_uncalibrated_synthetic_smoke_model_says_so():
    card = card_markdown(
        facts(calibration_split=None, temperature=1.0, synthetic=True, smoke=True, data_name="synthetic")
    )
    assert "Its probabilities are not calibrated (temperature 1)" in card
    assert "Not calibrated: temperature 1." in card and "after" not in card.split("## Calibration")[1]
    assert "generated images (--data synthetic)" in card and "--smoke study" in card
    assert "from the synthetic set" in card


def test_a_model_that_is_not_registered_has_no_serving_line():
    card = card_markdown(facts(title="reference-convnext_tiny", model_uri=None))
    assert card.startswith("# reference-convnext_tiny\n") and "mlflow models serve" not in card


def test_a_class_name_with_a_bar_does_not_break_the_table():
    card = card_markdown(facts(classes=(ClassRow("a|b", 3, 1.0, 1.0), ClassRow("c", 3, 1.0, 1.0))))
    assert "| a\\|b | 3 | 1.0000 | 1.0000 |" in card


def test_a_thousand_classes_fit_the_registry_description_with_the_weakest_classes_shown():
    many = facts(count=1000)
    whole = card_markdown(many)
    assert len(whole) > DESCRIPTION_LIMIT and whole.count("| class-") == 1000
    short = card_markdown(many, DESCRIPTION_LIMIT)
    assert len(short) <= DESCRIPTION_LIMIT and re.findall(r"^## (.+)$", short, flags=re.MULTILINE) == SECTIONS
    shown = re.findall(r"^\| (class-\d+) \|", short, flags=re.MULTILINE)
    assert 0 < len(shown) < 1000 and shown == [f"class-{i:04d}" for i in range(len(shown))]  # lowest sensitivity
    assert f"The {len(shown)} classes of lowest sensitivity of 1000" in short and "model_card.md" in short
    assert card_markdown(facts(), DESCRIPTION_LIMIT) == card_markdown(facts())  # a short card is left whole


def test_tags_say_accuracy_classes_size_study_model_and_temperature():
    assert card_tags(facts()) == {
        "test_acc": "0.8205",
        "classes": "benign,malignant,normal",
        "num_classes": "3",
        "img_size": "224",
        "model": "cnn",
        "temperature": "1.4321",
        "study": "busi-cnn",
    }
    assert "study" not in card_tags(facts(study=None))


def test_a_long_class_list_is_cut_and_says_how_many_more():
    names = [f"class-{i:04d}" for i in range(1000)]
    tag = listed(names, CLASSES_TAG_LIMIT)
    assert len(tag) <= CLASSES_TAG_LIMIT and tag.startswith("class-0000,class-0001,")
    kept = tag.split(",…")[0].split(",")
    assert tag.endswith(f",… (+{1000 - len(kept)} more)") and kept == names[: len(kept)]
    assert listed(["a", "b"], CLASSES_TAG_LIMIT) == "a,b"


# ---------------------------------------------------------------- how the split was made


def index_of(source: Path | str, groups: bool = False, split_by: str = "stratified") -> DatasetIndex:
    splits = {
        split: [Sample(f"{split}{i}.png", i % 2, f"p-{split}-{i // 2}" if groups else None) for i in range(4)]
        for split in ("train", "val", "test")
    }
    return DatasetIndex(str(source), ["a", "b"], splits, split_by=split_by)


def test_a_folder_is_split_stratified_with_the_seed(tmp_path):
    assert split_method(index_of(tmp_path), 7, smoke=False) == (
        "stratified by class, 70/15/15 % of each class's images, seed 7"
    )
    assert split_method(index_of("synthetic"), 7, smoke=True).endswith(
        "per-class subsample of each split (--smoke, seed 7)"
    )


def test_a_presplit_folder_is_used_as_given(tmp_path):
    text = split_method(index_of(tmp_path, split_by="folders"), 0, smoke=False)
    assert text == "as given: the source's train/, val/ and test/ folders"


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("path,label,group", "grouped by patient (scikit-learn's StratifiedGroupKFold), seed 3"),
        ("path,label,group,split", "as the manifest's split column says"),
    ],
)
def test_a_manifest_with_patients_says_no_patient_is_in_two_splits(tmp_path, header, expected):
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(header + "\n" + ",".join(["a.png", "a", "p1", "train"][: header.count(",") + 1]) + "\n")
    split_by = "manifest_column" if header.endswith("split") else "patients"
    text = split_method(index_of(manifest, groups=True, split_by=split_by), 3, smoke=False)
    assert expected in text and "no patient has images in two splits (patients: train 2, val 2, test 2)" in text


def test_a_manifest_without_groups_is_split_by_image(tmp_path):
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("path,label\na.png,a\n")
    text = split_method(index_of(manifest), 3, smoke=False)
    assert text == "stratified by class, 70/15/15 % of each class's images, seed 3"


def test_the_card_lists_the_knobs_of_its_model_and_a_reference_those_every_model_has():
    from search.final_model.card import knobs_shown
    from trainables.config import Hyperparameters

    values = Hyperparameters().to_dict()
    assert "vit_depth" in knobs_shown("vit", values) and "fusion" in knobs_shown("hybrid", values)
    assert "vit_depth" not in knobs_shown("cnn", values)
    reference = knobs_shown("reference", values)
    assert {"lr", "batch_size", "dropout"} <= set(reference) and not {"vit_depth", "fusion"} & set(reference)


def test_the_card_names_the_trial_as_its_study_did_and_an_older_records_id_as_rays():
    """card_facts takes Winner.trial_name: t07, or for a best_config.yaml without the name, Ray's id, said so."""
    from search.records.split import SplitSpec
    from search.records.winner import Winner
    from trainables.config import Hyperparameters

    def named(**trial) -> str | None:
        split = SplitSpec("synthetic", 0)
        return Winner(
            model="cnn", hyperparameters=Hyperparameters(), classes=["a", "b"], split=split, img_size=32, **trial
        ).trial_name

    assert named(trial="t07", trial_id="e5c2dbbe") == "t07"
    assert named(trial_id="e5c2dbbe") == "e5c2dbbe (Ray's trial id)"
    assert named() is None
    assert "- Study `busi-cnn`, trial t07.\n" in card_markdown(facts(trial=named(trial="t07", trial_id="e5c2dbbe")))
    older = card_markdown(facts(trial=named(trial_id="e5c2dbbe")))
    assert "- Study `busi-cnn`, trial e5c2dbbe (Ray's trial id).\n" in older
    assert "- Study `busi-cnn`.\n" in card_markdown(facts(trial=named()))


def test_an_averaged_model_s_calibration_names_the_networks_temperatures_and_the_average_s():
    from search.final_model.card import calibration_section

    text = calibration_section(facts(calibration_split="val", calibration_averaged=6, temperature=0.427))
    assert "6 probabilities averaged (members × views)" in text and "by T = 0.4270" in text
    assert "Dividing the logits by T" not in text  # the one-network sentence
