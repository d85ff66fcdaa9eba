"""A CSV manifest as --data: its refusals, the split by patient, a given split column, its digest; one slow study."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import run_script, write_image_folder, write_manifest, write_patient_images

from search.records.study_config import SMOKE
from trainables.data import SPLITS, DataError, cache_split, data_digest, index_source, split_digest, subsample
from trainables.manifest import grouped_split
from trainables.privacy import patient_hash, patient_hashes, patient_salt


def patients(per_class: dict[str, int], images: int = 3) -> dict[str, tuple[str, int]]:
    """{'benign-p00': ('benign', images), ...}: per_class[c] patients of class c."""
    return {f"{label}-p{n:02d}": (label, images) for label, count in per_class.items() for n in range(count)}


@pytest.fixture
def grouped(tmp_path: Path) -> Path:
    """A manifest of 3 classes, 8 patients each, 3 images per patient, without a split column."""
    rows = write_patient_images(tmp_path / "scans", patients({"benign": 8, "malignant": 8, "normal": 8}))
    return write_manifest(tmp_path / "manifest.csv", "path,label,group", rows)


def refusal(path: Path | str, seed: int = 0) -> str:
    with pytest.raises(DataError) as caught:
        index_source(path, seed)
    message = str(caught.value)
    assert "\n" not in message
    return message


def group_sets(index) -> dict[str, set[str]]:
    return {split: {s.group for s in index.splits[split]} for split in SPLITS}


# ---------------------------------------------------------------- reading


def test_manifest_rows_are_indexed_with_keys_relative_to_its_folder(tmp_path):
    write_image_folder(tmp_path / "data" / "imgs", {"a": 3, "b": 3})
    absolute = tmp_path / "data" / "imgs" / "b" / "002.png"  # inside the manifest's folder: a relative key
    rows = [f"imgs/a/{i:03d}.png,cat,{split}" for i, split in enumerate(SPLITS)]
    rows += ["imgs/b/000.png,dog,train", "./imgs/b/001.png,dog,VAL", f"{absolute},dog,test"]
    manifest = write_manifest(tmp_path / "data" / "list.csv", " Path , Label ,split", rows)

    index = index_source(manifest, seed=0)
    assert index.is_manifest and index.root == tmp_path / "data" and index.source == str(manifest)
    assert index.classes == ["cat", "dog"]
    assert [s.key for s in index.splits["test"]] == ["imgs/a/002.png", "imgs/b/002.png"]
    assert [s.key for s in index.splits["val"]] == ["imgs/a/001.png", "imgs/b/001.png"]
    cached = cache_split(index, "test", 16, tmp_path / "cache")  # decoded from the manifest's folder
    assert cached.images().shape == (2, 16, 16, 3)
    assert len(index.summary()["manifest_digest"]) == 12 and "train_groups" not in index.summary()


@pytest.mark.parametrize(
    ("header", "rows", "expected"),
    [
        ("", [], "is empty"),
        ("path,label", [], "has a header but no rows"),
        ("path,label,patient", ["x.png,a,p1"], "unknown column(s) 'patient'"),
        ("path,group", ["x.png,p1"], "no label column"),
        ("path,label,label", ["x.png,a,a"], "label given twice"),
        ("path,label", ["img/0.png,a,extra"], "do not have the header's 2 columns (line 2)"),
        ("path,label", ["img/0.png,", "img/1.png,b"], "have no label (line 2)"),
        ("path,label,group", ["img/0.png,a,", "img/1.png,b,p2"], "have no group (line 2)"),
        ("path,label", ["img/0.png,a", "img/../img/0.png,b"], "img/0.png (lines 2, 3)"),
        ("path,label", [f"gone/{i}.png,a" for i in range(5)], "5 file(s) listed in manifest"),
        ("path,label", ["img/0.png,a", "img/1.png,a"], "names one class (a)"),
        ("path,label,split", ["img/0.png,a,train", "img/1.png,b,validation"], "line 3: 'validation'"),
    ],
)
def test_a_bad_manifest_is_refused_in_one_line(tmp_path, header, rows, expected):
    write_image_folder(tmp_path, {"img": 4})
    for i in range(4):
        os.rename(tmp_path / "img" / f"{i:03d}.png", tmp_path / "img" / f"{i}.png")
    manifest = tmp_path / "m.csv"
    manifest.write_text("\n".join([header, *rows]) + ("\n" if header else ""))
    message = refusal(manifest)
    assert expected in message, message
    if "file(s) listed" in expected:
        assert "gone/0.png, gone/1.png, gone/2.png, ..." in message and str(tmp_path) in message


def test_a_manifest_separated_by_semicolons_is_refused_naming_the_separator(tmp_path):
    write_image_folder(tmp_path, {"img": 2})
    manifest = tmp_path / "export.csv"
    manifest.write_text("Path;Label;Group\nimg/000.png;a;p1\nimg/001.png;b;p2\n")
    message = refusal(manifest)
    assert "separates its columns with semicolons ('Path;Label;Group'), not with commas" in message, message
    assert "save it as comma-separated CSV" in message and "unknown column" not in message
    manifest.write_text("path\tlabel\nimg/000.png\ta\n")
    assert "separates its columns with tabs" in refusal(manifest)


def test_a_row_without_a_group_is_named_and_the_column_is_not_to_be_dropped(tmp_path):
    rows = write_patient_images(tmp_path / "scans", patients({"a": 3, "b": 3}))
    rows[1] = rows[1].rsplit(",", 1)[0] + ","  # line 3
    rows[4] = rows[4].rsplit(",", 1)[0] + ",  "  # line 6: blank is empty
    message = refusal(write_manifest(tmp_path / "m.csv", "path,label,group", rows))
    assert message.startswith("2 row(s) of manifest") and "have no group (line 3, 6)" in message, message
    assert "fill in each image's patient (or study) id" in message and "drop" not in message


def test_labels_that_differ_only_in_case_are_refused_naming_both(tmp_path):
    rows = write_patient_images(tmp_path / "scans", patients({"Benign": 3, "malignant": 3}))
    rows[4] = rows[4].replace(",Benign,", ",benign,")  # line 6
    message = refusal(write_manifest(tmp_path / "m.csv", "path,label,group", rows))
    assert "labels that differ only in case: 'Benign' (line 2) and 'benign' (line 6)" in message, message
    assert "write each class one way" in message


def test_a_missing_manifest_is_refused_and_a_file_that_is_none_too(tmp_path):
    assert "manifest" in refusal(tmp_path / "nowhere.csv") and "does not exist" in refusal(tmp_path / "nowhere.csv")
    (tmp_path / "notes.txt").write_text("x")
    assert "is a file: pass the folder that holds the class sub-folders, a CSV manifest" in refusal(
        tmp_path / "notes.txt"
    )


# ---------------------------------------------------------------- a split column


def given_split_rows(tmp_path: Path) -> list[str]:
    rows = write_patient_images(tmp_path / "scans", patients({"a": 3, "b": 3}, images=2))
    splits = {"p00": "train", "p01": "val", "p02": "test"}
    return [f"{row},{splits[row.rsplit('-', 1)[1]]}" for row in rows]


def test_a_split_column_is_used_as_given(tmp_path):
    rows = given_split_rows(tmp_path)
    index = index_source(write_manifest(tmp_path / "m.csv", "path,label,group,split", rows), seed=0)
    assert group_sets(index) == {"train": {"a-p00", "b-p00"}, "val": {"a-p01", "b-p01"}, "test": {"a-p02", "b-p02"}}
    assert index_source(tmp_path / "m.csv", seed=5).splits == index.splits  # the seed plays no part
    assert index.summary()["test_groups"] == 2


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda rows: [*rows[:-1], rows[-1].replace(",test", ",train")], "1 patient group(s)"),
        (lambda rows: [r.replace(",val", ",train") for r in rows], "puts no image in val"),
        (lambda rows: [r.replace(",test", ",train") if r.startswith("scans/a") else r for r in rows], "class(es) a"),
    ],
)
def test_a_given_split_that_leaks_a_patient_or_leaves_a_split_empty_is_refused(tmp_path, change, expected):
    rows = change(given_split_rows(tmp_path))
    message = refusal(write_manifest(tmp_path / "m.csv", "path,label,group,split", rows))
    assert expected in message, message


def test_a_patient_in_several_splits_is_named_by_hash_with_its_splits_and_lines(tmp_path):
    rows = given_split_rows(tmp_path)
    # Each p00 patient gets a test image too, and a-p01 a train one: three patients span splits.
    rows = [r.replace(",train", ",test", 1) if r.split(",")[0].endswith("_1.png") else r for r in rows]
    rows = [r.replace(",val", ",train") if r.startswith("scans/a-p01_0") else r for r in rows]
    message = refusal(write_manifest(tmp_path / "m.csv", "path,label,group,split", rows))
    assert message.startswith("3 patient group(s) of manifest")
    a00, a01, b00 = (patient_hash(patient, patient_salt()) for patient in ("a-p00", "a-p01", "b-p00"))
    assert f"{a00} in train and test (line 2, 3), {a01} in train and val (line 4, 5), " in message
    assert f"{b00} in train and test (line 8, 9)" in message
    assert "a-p00 in" not in message  # the raw id only in the file's name, never as the patient


# ---------------------------------------------------------------- the split by patient


def random_patients(seed: int, count: int, classes: int, mixed: bool) -> tuple[np.ndarray, list[str]]:
    """count patients of 1 to 6 images; mixed: a patient's images may be of several classes."""
    rng = np.random.default_rng(seed)
    labels, groups = [], []
    for patient in range(count):
        label = rng.integers(classes)
        for image in range(rng.integers(1, 7)):
            labels.append((label + image * mixed * rng.integers(2)) % classes)
            groups.append(f"p{patient:03d}")
    return np.array(labels), groups


@pytest.mark.parametrize(("count", "mixed"), [(150, False), (150, True), (9, False)])
def test_the_split_by_patient_keeps_each_patient_in_one_split_and_every_class_in_each(count, mixed):
    labels, groups = random_patients(count, count, 3, mixed)
    if count == 9:  # exactly three patients per class: one each for train, val and test
        labels, groups = np.repeat(np.arange(3), 6), [f"p{i // 2}" for i in range(18)]
    classes = ["a", "b", "c"]
    first = grouped_split(labels, groups, seed=3, classes=classes)
    owner = np.array(groups)
    patients_of = {split: set(owner[members]) for split, members in first.items()}
    assert not (patients_of["train"] & patients_of["val"] or patients_of["train"] & patients_of["test"])
    assert not patients_of["val"] & patients_of["test"]
    assert sorted(np.concatenate(list(first.values()))) == list(range(len(labels)))
    assert all(set(labels[members]) == {0, 1, 2} for members in first.values())
    if count == 150:  # about 71/14/14 % of the images
        assert 0.09 < len(first["test"]) / len(labels) < 0.2 and 0.09 < len(first["val"]) / len(labels) < 0.2
    again = grouped_split(labels, groups, seed=3, classes=classes)
    other = grouped_split(labels, groups, seed=4, classes=classes)
    assert all(np.array_equal(first[s], again[s]) for s in SPLITS)
    assert count == 9 or not np.array_equal(first["test"], other["test"])


def test_the_split_by_patient_from_a_manifest_is_seeded_and_grouped(grouped):
    index = index_source(grouped, seed=0)
    sets = group_sets(index)
    assert not (sets["train"] & sets["val"] or sets["train"] & sets["test"] or sets["val"] & sets["test"])
    assert all({s.label for s in index.splits[split]} == {0, 1, 2} for split in SPLITS)
    assert index_source(grouped, seed=0).splits == index.splits  # final.py re-indexes: the same test split
    assert index_source(grouped, seed=1).splits["test"] != index.splits["test"]
    assert {key for key in index.summary() if key.endswith("_groups")} == {f"{s}_groups" for s in SPLITS}


def test_a_class_in_too_few_patients_is_refused(tmp_path):
    rows = write_patient_images(tmp_path / "scans", patients({"a": 5, "b": 2}))
    message = refusal(write_manifest(tmp_path / "m.csv", "path,label,group", rows))
    named = ", ".join(patient_hashes({"b-p00", "b-p01"}, patient_salt()))
    assert f"class 'b' has its images in 2 patient(s) ({named})" in message and "needs at least 3" in message


def test_without_a_group_column_each_image_is_its_own_group(tmp_path):
    rows = [row.rsplit(",", 1)[0] for row in write_patient_images(tmp_path / "scans", patients({"a": 4, "b": 4}))]
    index = index_source(write_manifest(tmp_path / "m.csv", "path,label", rows), seed=0)
    assert {split: len(samples) for split, samples in index.splits.items()} == {"train": 16, "val": 4, "test": 4}
    assert not index.has_groups
    rows = rows[:2] + [row for row in rows if "scans/b" in row]
    assert "class 'a' has 2 image(s)" in refusal(write_manifest(tmp_path / "m.csv", "path,label", rows))


# ---------------------------------------------------------------- the digest


def test_the_digest_changes_with_the_manifest_and_with_its_files(grouped):
    before = index_source(grouped, seed=0)
    digest, test_digest = data_digest(before), split_digest(before, "test")
    assert data_digest(index_source(grouped, seed=0)) == digest

    lines = grouped.read_text().splitlines()
    grouped.write_text("\n".join([*lines[:-1], lines[-1].rsplit(",", 1)[0] + ",p77"]) + "\n")  # a new id
    changed = index_source(grouped, seed=0)
    assert data_digest(changed) != digest and split_digest(changed, "test") != test_digest

    grouped.write_text("\n".join(lines) + "\n")
    assert data_digest(index_source(grouped, seed=0)) == digest  # the same manifest: the same data
    image = grouped.parent / before.splits["train"][0].key
    os.utime(image, ns=(0, 0))
    assert data_digest(index_source(grouped, seed=0)) != digest


# ---------------------------------------------------------------- a real study, then final.py


@pytest.mark.slow
def test_a_study_from_a_manifest_records_its_split_and_leaks_and_final_tests_the_same_images(tmp_path):
    rows = write_patient_images(tmp_path / "scans", patients({"benign": 6, "malignant": 6, "normal": 6}, images=2))
    # One scan saved again under another name, for a patient of its own: a leak whenever it lands elsewhere.
    shutil.copy(tmp_path / "scans" / "benign-p00_0.png", tmp_path / "scans" / "copy.png")
    rows.append("scans/copy.png,benign,benign-p99")
    manifest = write_manifest(tmp_path / "data" / "manifest.csv", "path,label,group", [f"../{row}" for row in rows])
    seed = next(s for s in range(50) if copy_leaks(manifest, s))
    index = subsample(index_source(manifest, seed), SMOKE.per_class or {}, seed)  # the study's split
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    common = ["--tracking-uri", uri, "--cache-dir", str(tmp_path / "cache"), "--no-pretrained"]
    result = run_script(
        "run.py",
        *["--model", "vit", "--smoke", "--trials", "1", "--epochs", "1", "--seed", str(seed), "--name", "scans"],
        *["--data", str(manifest), "--storage-path", str(tmp_path / "ray"), *common],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "warning: 1 pair(s) of duplicate images across splits" in result.stdout

    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("vit").experiment_id
    (parent,) = [r for r in client.search_runs([experiment]) if "mlflow.parentRunId" not in r.data.tags]
    params, metrics = parent.data.params, parent.data.metrics
    assert params["manifest_digest"] and params["on_leak"] == "warn"
    for split in SPLITS:
        assert int(params[f"{split}_images"]) == len(index.splits[split])
        assert int(params[f"{split}_groups"]) == len(index.groups(split))
    assert sum(value for key, value in metrics.items() if key.startswith("leak_exact_")) == 1
    recorded = json.loads(Path(client.download_artifacts(parent.info.run_id, "split.json", str(tmp_path))).read_text())
    assert recorded["test"]["images"] == [s.key for s in index.splits["test"]]
    assert recorded["test"]["groups"] == patient_hashes(index.groups("test"), patient_salt())
    leaks = Path(client.download_artifacts(parent.info.run_id, "leakage.csv", str(tmp_path))).read_text()
    assert "../scans/copy.png" in leaks and "../scans/benign-p00_0.png" in leaks

    final = run_script("final.py", "--study", "scans", "--out", str(tmp_path / "final"), *common, cwd=tmp_path)
    assert final.returncode == 0, final.stdout[-3000:] + final.stderr[-3000:]
    tested = json.loads((tmp_path / "final" / "splits.json").read_text())
    assert tested["test"] == recorded["test"]["images"]


def copy_leaks(manifest: Path, seed: int) -> bool:
    """Whether the planted copy and its original land in different splits under this seed."""
    index = subsample(index_source(manifest, seed), SMOKE.per_class or {}, seed)
    split_of = {s.key: split for split, samples in index.splits.items() for s in samples}
    return split_of.get("../scans/copy.png", "a") != split_of.get("../scans/benign-p00_0.png", "a")


def test_each_index_records_how_it_split_its_source(tmp_path, grouped):
    """The rule the model card names (DatasetIndex.split_by), from the indexer that applied it."""
    with_split = write_manifest(tmp_path / "given.csv", "path,label,group,split", given_split_rows(tmp_path))
    ungrouped = [row.rsplit(",", 1)[0] for row in write_patient_images(tmp_path / "x", patients({"a": 4, "b": 4}))]
    for split in ("train", "val", "test"):
        write_image_folder(tmp_path / "presplit" / split, {"a": 1, "b": 1})
    assert index_source(grouped, seed=0).split_by == "patients"
    assert index_source(with_split, seed=0).split_by == "manifest_column"
    assert index_source(write_manifest(tmp_path / "m.csv", "path,label", ungrouped), seed=0).split_by == "stratified"
    assert index_source(tmp_path / "presplit", seed=0).split_by == "folders"
    assert index_source("synthetic", seed=0).split_by == "stratified"
