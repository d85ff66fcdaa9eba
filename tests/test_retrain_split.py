"""The retrain tests on the study's own test split (its split.json), not on whatever the data splits into now.

First the logic that turns a record into the retrain's index, that --resume and compare.py check
against, without a study; then one small study from a manifest whose group column is edited
afterwards, retrained, compared and resumed (slow: the study and the retrain take a while).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import run_script, write_image_folder, write_manifest, write_patient_images

from search.comparison.plan import held_out_difference
from search.errors import UsageError
from search.final_model.study_split import index_from_record, retrain_index
from search.study.resume import split_changes
from search.tracking.study_run import SplitRecord, split_record
from trainables.data import SPLITS, DatasetIndex, index_source
from trainables.privacy import patient_hash, patient_salt

STUDY, SEED = "splitting", 0


def record_of(index: DatasetIndex, **changes) -> SplitRecord:
    """The record a study of this index would write, read back as the reader gives it."""
    written = split_record(index, SEED)
    images = {split: written[split]["images"] for split in SPLITS}
    return SplitRecord(STUDY, written["source"], SEED, written.get("manifest_digest"), images, **changes)


def manifest_of(root: Path, patients: int = 7) -> Path:
    rows = write_patient_images(root / "scans", {f"p{i:02d}": ("abc"[i % 3], 2) for i in range(3 * patients)}, 32)
    return write_manifest(root / "manifest.csv", "path,label,group", rows)


def with_groups_renamed(manifest: Path) -> None:
    """Only the group column edited: each patient id renamed (p00 to patient-20, p01 to patient-19...), which
    orders the patients otherwise, and so cuts another split by patient with the same seed."""
    header, *rows = manifest.read_text().splitlines()
    renamed = [f"{row.rsplit(',p', 1)[0]},patient-{99 - int(row.rsplit(',p', 1)[1]):02d}" for row in rows]
    manifest.write_text("\n".join([header, *renamed]) + "\n")


def keys(index: DatasetIndex, split: str) -> list[str]:
    return [sample.key for sample in index.splits[split]]


# ---------------------------------------------------------------- the record becomes the index (no study)


def test_an_edited_group_column_keeps_the_study_s_split_with_a_note(tmp_path):
    manifest = manifest_of(tmp_path)
    record = record_of(index_source(manifest, SEED))
    with_groups_renamed(manifest)
    now = index_source(manifest, SEED)
    assert keys(now, "test") != record.images["test"]  # the same seed cuts another split now

    index, notes = index_from_record(now, record, smoke=False)
    assert {split: keys(index, split) for split in SPLITS} == record.images
    assert all(sample.group.startswith("patient-") for sample in index.splits["train"])  # today's rows
    (note,) = notes
    assert note.startswith(f"note: manifest {manifest} changed since study '{STUDY}' ran (digest ")
    assert "the retrain keeps the study's split" in note


def test_labels_come_from_the_data_as_it_is_now(tmp_path):
    manifest = manifest_of(tmp_path)
    record = record_of(index_source(manifest, SEED))
    relabelled = record.images["test"][0]
    lines = manifest.read_text().splitlines()
    manifest.write_text(
        "\n".join(
            line.replace(",a,", ",b,").replace(",c,", ",b,") if line.startswith(relabelled) else line for line in lines
        )
        + "\n"
    )
    index, _ = index_from_record(index_source(manifest, SEED), record, smoke=False)
    assert index.splits["test"][0].key == relabelled and index.classes[index.splits["test"][0].label] == "b"


def test_an_image_the_study_split_that_is_gone_is_refused_with_count_and_first_three(tmp_path):
    folder = write_image_folder(tmp_path / "images", {"a": 10, "b": 10})
    record = record_of(index_source(folder, SEED))
    gone = record.images["test"][:2] + record.images["train"][:2]
    for key in gone:
        (folder / key).unlink()
    with pytest.raises(UsageError) as refused:
        index_from_record(index_source(folder, SEED), record, smoke=False)
    message = str(refused.value)
    assert message.startswith(f"4 of the 20 images study '{STUDY}' split are not in {folder} now (e.g. "), message
    assert ", ..." in message and "\n" not in message


def test_images_the_study_never_had_are_left_out_with_a_note(tmp_path):
    folder = write_image_folder(tmp_path / "images", {"a": 10, "b": 10})
    before = index_source(folder, SEED)
    undecodable = keys(before, "train")[0]  # the study could not decode it: left out of its record, and named
    record = record_of(before, skipped=frozenset({undecodable}))
    record.images["train"].remove(undecodable)
    shutil.copy(folder / "a" / "000.png", folder / "a" / "new.png")
    now = index_source(folder, SEED)
    index, notes = index_from_record(now, record, smoke=False)
    assert sum(len(samples) for samples in index.splits.values()) == 19
    assert notes == [
        f"note: 1 image(s) of {folder} are not in the split of study '{STUDY}' (e.g. a/new.png): added since it "
        f"ran; left out, as the study never had them"
    ]
    assert index_from_record(now, record, smoke=True)[1] == []  # a subsample leaves images out by design


def test_patients_whose_images_now_span_the_study_s_splits_are_warned_about(tmp_path):
    manifest = manifest_of(tmp_path)
    record = record_of(index_source(manifest, SEED))
    train_key, test_key = record.images["train"][0], record.images["test"][0]
    lines = manifest.read_text().splitlines()
    # The test image's patient id corrected to the train image's: one patient, on both sides of the split
    train_group = next(line for line in lines if line.startswith(train_key + ",")).rsplit(",", 1)[1]
    manifest.write_text(
        "\n".join(
            f"{line.rsplit(',', 1)[0]},{train_group}" if line.startswith(test_key + ",") else line for line in lines
        )
        + "\n"
    )
    _, notes = index_from_record(index_source(manifest, SEED), record, smoke=False)
    assert notes[-1].startswith("warning: by the group column as it is now, 1 patient(s) have images in the study's")
    assert f"(e.g. {patient_hash(train_group, patient_salt())} ({test_key}))" in notes[-1]  # never the raw id


def test_a_study_without_a_record_is_split_again_with_a_note(tmp_path, capsys):
    from search.records.winner import Winner

    folder = write_image_folder(tmp_path / "images", {"a": 10, "b": 10})
    raw = {"model": "vit", "hyperparameters": {}, "classes": ["a", "b"], "data": str(folder), "seed": SEED}
    config = Winner.from_dict({**raw, "img_size": 32}, "config best_config.yaml")
    index = retrain_index(index_source(folder, SEED), config.split, None, "study 'old' predates split.json")
    assert keys(index, "test") == keys(index_source(folder, SEED), "test")
    out = capsys.readouterr().out
    assert out.startswith("note: study 'old' predates split.json: the split could not be checked against the study's")


# ---------------------------------------------------------------- what --resume and compare.py check


def test_resume_names_what_changed_in_the_split(tmp_path):
    folder = write_image_folder(tmp_path / "images", {"a": 10, "b": 10})
    index = index_source(folder, SEED)
    assert split_changes(record_of(index), index) == []
    undecodable = keys(index, "train")[0]
    skipped = record_of(index, skipped=frozenset({undecodable}))
    skipped.images["train"].remove(undecodable)  # a study leaves the files it cannot decode out of its record
    assert split_changes(skipped, index) == []

    shutil.copy(folder / "a" / "000.png", folder / "a" / "new.png")  # one file more: the split moves
    changes = split_changes(record_of(index), index_source(folder, SEED))
    assert changes[0].split(" (e.g. ")[0].endswith("of its images are in another split"), changes
    assert changes[-1] == "1 image(s) are new (e.g. a/new.png)"


def test_compared_studies_must_hold_out_the_same_test_images(tmp_path):
    manifest = manifest_of(tmp_path)
    first = record_of(index_source(manifest, SEED))
    assert held_out_difference(first, first) == ""
    with_groups_renamed(manifest)
    second = replace(record_of(index_source(manifest, SEED)), study="other")
    only_first = [key for key in first.images["test"] if key not in second.images["test"]]
    difference = held_out_difference(first, second)
    assert difference.startswith(f"{len(only_first)} of {STUDY}'s are not in other's, e.g. {only_first[0]}")
    reordered = replace(first, images={**first.images, "test": first.images["test"][::-1]})
    assert held_out_difference(first, reordered) == "the same images in another order"


# ---------------------------------------------------------------- one study, its data edited afterwards


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A finished study on a manifest of 21 patients (2 images each), its split.json read back."""
    from mlflow.tracking import MlflowClient

    from search.tracking.study_run import find_study, read_split_record

    root = tmp_path_factory.mktemp("split")
    manifest = manifest_of(root / "data")
    uri = f"sqlite:///{root}/mlflow.db"
    common = ["--tracking-uri", uri, "--cache-dir", str(root / "cache")]
    result = run_script(
        "run.py",
        *["--model", "vit", "--trials", "1", "--epochs", "1", "--img-size", "32", "--no-pretrained"],
        *["--seed", str(SEED), "--name", STUDY, "--data", str(manifest), "--storage-path", str(root / "ray"), *common],
        cwd=root,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    record = read_split_record(MlflowClient(uri), find_study(uri, STUDY))
    assert record is not None and record.images["test"]
    return SimpleNamespace(root=root, manifest=manifest, uri=uri, common=common, record=record)


@contextmanager
def edited(manifest: Path, edit: Callable[[Path], None]) -> Iterator[None]:
    """The manifest edited for the block's time, then put back byte for byte (the same digest)."""
    original = manifest.read_bytes()
    try:
        edit(manifest)
        yield
    finally:
        manifest.write_bytes(original)


def final_runs(uri: str) -> int:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    return len(client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.role = 'final'"))


@pytest.mark.slow
def test_an_edited_group_column_is_retrained_and_tested_on_the_study_s_own_split(study, tmp_path, capsys):
    """The issue's case: only the group column edited after the study, then final.py --study."""
    from search.evaluation.predictions import read_predictions
    from search.final import main

    out = tmp_path / "final"
    with edited(study.manifest, with_groups_renamed):
        assert keys(index_source(study.manifest, SEED), "test") != study.record.images["test"]
        assert main(["--study", STUDY, "--no-pretrained", "--out", str(out), *study.common]) == 0
    printed = capsys.readouterr().out
    assert f"note: manifest {study.manifest} changed since study '{STUDY}' ran (digest " in printed
    tested = json.loads((out / "splits.json").read_text())
    assert {split: tested[split] for split in SPLITS} == study.record.images
    predictions = read_predictions((out / "test_predictions.csv").read_text(), "test_predictions.csv")
    assert predictions.keys == study.record.images["test"]


@pytest.mark.slow
def test_a_study_image_gone_from_the_data_is_refused_before_any_run(study, tmp_path, capsys):
    from search.final import main

    gone = study.record.images["test"][:4]
    before = final_runs(study.uri)

    def without_rows(manifest: Path) -> None:
        lines = manifest.read_text().splitlines()
        manifest.write_text("\n".join(line for line in lines if line.split(",")[0] not in gone) + "\n")

    with edited(study.manifest, without_rows):
        assert main(["--study", STUDY, "--no-pretrained", "--out", str(tmp_path / "x"), *study.common]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(
        f"search/final.py: error: 4 of the 42 images study '{STUDY}' split are not in {study.manifest} now "
        f"(e.g. {', '.join(gone[:3])}, ...): the retrain tests on the study's own test images only"
    )
    assert final_runs(study.uri) == before and not (tmp_path / "x").exists()


@pytest.mark.slow
def test_unchanged_data_is_split_as_the_study_recorded_without_a_note(study, capsys):
    from search.final import build_parser, load_winner, retrain_request
    from search.final_model.retrain import prepare_final

    args = build_parser().parse_args(["--study", STUDY, "--no-pretrained", *study.common])
    prepared = prepare_final(retrain_request(args), load_winner(args))
    assert {split: keys(prepared.index, split) for split in SPLITS} == study.record.images
    assert prepared.settings.split_from == "study_record" and "note:" not in capsys.readouterr().out


@pytest.mark.slow
def test_resume_on_a_changed_split_is_refused_naming_what_changed(study):
    from search.cli import given_options
    from search.run import build_parser
    from search.study.preflight import check_study
    from search.study.resume import resumed_config

    argv = ["--model", "vit", "--name", STUDY, "--resume", "--trials", "2", "--storage-path", str(study.root / "ray")]
    argv += study.common
    with edited(study.manifest, with_groups_renamed):
        config, run_id = resumed_config(build_parser().parse_args(argv), given_options(build_parser(), argv))
        with pytest.raises(UsageError) as refused:
            check_study(config, run_id)
    message = str(refused.value)
    assert message.startswith(f"the data of study '{STUDY}' no longer splits as it did (manifest {study.manifest} ")
    assert "of its images are in another split (e.g. " in message and "\n" not in message
    assert message.endswith("put the data back as it was, or start a new study with another --name")


@pytest.mark.slow
def test_compare_refuses_studies_that_held_out_other_test_images(study, capsys):
    """Two studies of the same manifest path, seed and settings, the group column edited between them."""
    from search.compare import build_compare_parser
    from search.comparison.plan import plan_existing

    with edited(study.manifest, with_groups_renamed):
        second = run_script(
            "run.py",
            *["--model", "vit", "--trials", "1", "--epochs", "1", "--img-size", "32", "--no-pretrained"],
            *["--seed", str(SEED), "--name", "after-edit", "--data", str(study.manifest)],
            *["--storage-path", str(study.root / "ray"), *study.common],
            cwd=study.root,
        )
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    parser, _ = build_compare_parser()
    args = parser.parse_args(["--name", "cmp", "--studies", STUDY, "after-edit", "--tracking-uri", study.uri])
    with pytest.raises(UsageError) as refused:
        plan_existing(args)
    assert str(refused.value).startswith(f"studies {STUDY} and after-edit held out different test images (")
