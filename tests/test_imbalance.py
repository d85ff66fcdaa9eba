"""An imbalanced training split is said at a study's start, in one line: the ratio, the two classes, what to do."""

from __future__ import annotations

import sys
import types

from helpers import write_image_folder, write_manifest
from helpers.cli import call_main

from search.run import main
from search.study.imbalance import IMBALANCE_WARNING_RATIO, imbalance_warning
from trainables.data import DatasetIndex, Sample, index_source

SEARCHED = ["lr", "class_weighting"]


def index_of(train_counts: dict[str, int]) -> DatasetIndex:
    train = [Sample(f"{name}/{i}.png", label) for label, (name, n) in enumerate(train_counts.items()) for i in range(n)]
    return DatasetIndex("folder", list(train_counts), {"train": train, "val": [], "test": []})


def test_beyond_five_to_one_the_warning_names_the_ratio_the_two_classes_and_what_to_do():
    line = imbalance_warning(index_of({"normal": 60, "benign": 20, "malignant": 10}), "val_acc", SEARCHED)
    assert line == (
        "warning: the train split is imbalanced 6.0:1 (class 'normal': 60 images, class 'malignant': 10); "
        "consider --metric val_balanced_acc, which weighs classes alike; "
        "the space searches class_weighting (none, inverse, effective)"
    )


def test_up_to_five_to_one_nothing_is_said():
    assert IMBALANCE_WARNING_RATIO == 5.0
    assert imbalance_warning(index_of({"a": 50, "b": 10}), "val_acc", SEARCHED) is None
    assert imbalance_warning(index_of({"a": 51, "b": 10}), "val_acc", SEARCHED) is not None


def test_the_metric_already_balanced_is_not_suggested_and_a_space_without_the_knob_is_told_to_add_it():
    line = imbalance_warning(index_of({"a": 70, "b": 10}), "val_balanced_acc", ["lr"])
    assert line is not None and "--metric" not in line
    assert line.endswith("; add class_weighting to the space to search weighted losses")


def test_a_class_missing_from_train_is_named():
    line = imbalance_warning(index_of({"a": 8, "b": 0}), "val_acc", SEARCHED)
    assert line is not None and line.startswith("warning: the train split is imbalanced 8:0 (class 'a': 8 images")


def test_an_imbalanced_manifest_and_folder_are_found_on_their_train_split(tmp_path):
    """Counted on the train split as the study cuts it (stratified, per patient): not on the files."""
    folder = write_image_folder(tmp_path / "images", {"common": 40, "rare": 5}, size=32)
    line = imbalance_warning(index_source(str(folder), seed=0), "val_acc", SEARCHED)
    assert line is not None and "class 'common': 28 images, class 'rare': 3)" in line
    rows = [f"images/common/{i:03d}.png,common,p{i}" for i in range(40)]
    rows += [f"images/rare/{i:03d}.png,rare,q{i}" for i in range(5)]
    manifest = write_manifest(tmp_path / "scans.csv", "path,label,group", rows)
    line = imbalance_warning(index_source(str(manifest), seed=0), "val_acc", SEARCHED)
    assert line is not None and "class 'common'" in line and "class 'rare'" in line


def test_run_py_says_it_once_before_the_trials_start(tmp_path, monkeypatch, capsys):
    write_image_folder(tmp_path / "images", {"common": 40, "rare": 5}, size=32)
    studies = []
    driver = types.ModuleType("search.study.driver")  # the study itself (torch, Ray) is not this test's
    driver.run_study = lambda config, checked, **_: studies.append(config) or 0  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "search.study.driver", driver)
    args = ("--model", "cnn", "--data", "images", "--no-pretrained", "--img-size", "32", "--gpus-per-trial", "0")
    answer = call_main(main, *args, "--name", "first", cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert answer.code == 0 and len(studies) == 1, answer.err
    (line,) = [line for line in answer.out.splitlines() if "imbalanced" in line]
    assert line.startswith("warning: the train split is imbalanced 9.3:1 (class 'common': 28 images, class 'rare': 3)")
    assert "--metric val_balanced_acc" in line and "searches class_weighting" in line
    balanced_metric = ("--metric", "val_balanced_acc", "--name", "second")
    balanced = call_main(main, *args, *balanced_metric, cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert "--metric" not in balanced.out
