"""Results per subgroup (issue 26): the statistics on hand-counted cases, the manifest's declared columns and their
refusals, the study's record of them, and what final.py reports (metrics.json, the run, the card, the console)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from helpers import ROOT, study_config, write_manifest, write_patient_images
from helpers.cli import call_main, one_line_refusal
from helpers.smoke_study import laid_out_like_the_project

from search.evaluation.subgroups import (
    LOGGED_VALUES,
    MIN_IMAGES,
    SUBGROUP_TABLE,
    logged_metrics,
    metric_name,
    subgroup_table,
    summary_lines,
    table_columns,
)
from search.records.study_config import MANIFEST_COLUMNS, ConfigError, StudyConfig
from trainables.data import DataError, index_source
from trainables.manifest import COLUMNS

# ---------------------------------------------------------------- the statistics


def cases(right: int, wrong: int, label: int) -> tuple[list[int], list[int]]:
    """`right` images of `label` predicted as it, `wrong` predicted as the other class (of two)."""
    return [label] * (right + wrong), [label] * right + [1 - label] * wrong


def binary_site(positives: tuple[int, int], negatives: tuple[int, int]) -> tuple[list[int], list[int]]:
    """Labels and predictions of one site: (right, wrong) positives (class 1), then (right, wrong) negatives."""
    pos_labels, pos_predicted = cases(*positives, label=1)
    neg_labels, neg_predicted = cases(*negatives, label=0)
    return pos_labels + neg_labels, pos_predicted + neg_predicted


def two_sites() -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Site A: 40 positives (36 right), 40 negatives (38 right); site B: 40 positives (20 right), 40 negatives
    (30 right)."""
    a_labels, a_predicted = binary_site((36, 4), (38, 2))
    b_labels, b_predicted = binary_site((20, 20), (30, 10))
    return (
        np.array(a_labels + b_labels),
        np.array(a_predicted + b_predicted),
        ["A"] * len(a_labels) + ["B"] * len(b_labels),
    )


def test_known_counts_give_known_values_inside_their_intervals():
    labels, predicted, site = two_sites()
    table = subgroup_table(labels, predicted, ["benign", "malignant"], {"site": site})
    a, b = table.columns["site"]["A"], table.columns["site"]["B"]
    expected = {
        "A": {"acc": 74 / 80, "sensitivity": 36 / 40, "specificity": 38 / 40, "balanced_acc": (36 / 40 + 38 / 40) / 2},
        "B": {"acc": 50 / 80, "sensitivity": 20 / 40, "specificity": 30 / 40, "balanced_acc": (20 / 40 + 30 / 40) / 2},
    }
    for group, values in ((a, expected["A"]), (b, expected["B"])):
        assert group.images == 80 and group.note is None
        for key, value in values.items():
            interval = group.metrics[key]
            assert math.isclose(interval.value, value)
            assert interval.low <= value <= interval.high and interval.low < interval.high
    assert math.isclose(table.overall["acc"], 124 / 160) and math.isclose(table.overall["sensitivity"], 56 / 80)
    assert table.positive == "malignant"  # two classes, no --positive: the second


def test_a_subgroup_whose_interval_lies_wholly_below_overall_is_marked_and_no_other():
    labels, predicted, site = two_sites()
    table = subgroup_table(labels, predicted, ["benign", "malignant"], {"site": site})
    b = table.columns["site"]["B"]
    assert b.below_overall == ("acc", "balanced_acc", "sensitivity")  # specificity 0.75 vs 0.85: interval reaches it
    assert b.metrics["specificity"].high >= table.overall["specificity"]
    assert all(b.metrics[key].high < table.overall[key] for key in b.below_overall)
    assert table.columns["site"]["A"].below_overall == ()
    assert [(column, value) for column, value, _ in table.marked()] == [("site", "B")]


def test_a_small_subgroup_or_one_without_a_class_gets_its_values_and_no_interval_and_is_never_marked():
    labels, predicted, site = two_sites()
    small_labels, small_predicted = binary_site((0, 3), (0, 3))  # all wrong: worst of all, but 6 images
    lone_labels, lone_predicted = [0] * 12, [1] * 12  # 12 negatives, all wrong: no positive image
    labels = np.concatenate([labels, small_labels, lone_labels])
    predicted = np.concatenate([predicted, small_predicted, lone_predicted])
    site = site + ["C"] * 6 + ["D"] * 12
    table = subgroup_table(labels, predicted, ["benign", "malignant"], {"site": site})
    small, lone = table.columns["site"]["C"], table.columns["site"]["D"]
    assert small.note == f"6 image(s), fewer than {MIN_IMAGES}: no interval" and small.metrics["acc"].value == 0
    assert lone.note == "no image of class(es) malignant: no interval"
    assert math.isnan(lone.metrics["sensitivity"].value)  # no positive image: undefined, not 0
    for group in (small, lone):
        assert group.below_overall == ()
        assert all(math.isnan(i.low) and math.isnan(i.high) for i in group.metrics.values())
    record = json.loads(json.dumps(table.to_dict(), allow_nan=False))  # valid JSON: undefined is null
    assert record["columns"]["site"]["D"]["metrics"]["sensitivity"] == {"value": None, "low": None, "high": None}
    assert record["columns"]["site"]["C"]["note"] == small.note and "note" not in record["columns"]["site"]["A"]


def test_the_positive_class_decides_sensitivity_and_more_classes_without_one_average_each_against_the_rest():
    labels, predicted, site = two_sites()
    named = subgroup_table(labels, predicted, ["benign", "malignant"], {"site": site}, positive=0)
    a = named.columns["site"]["A"]
    assert named.positive == "benign" and math.isclose(a.metrics["sensitivity"].value, 38 / 40)
    assert math.isclose(a.metrics["specificity"].value, 36 / 40)

    three_labels = np.array([0] * 10 + [1] * 10 + [2] * 10)
    three_predicted = np.array([0] * 10 + [1] * 5 + [2] * 5 + [2] * 10)  # class 1 half called 2
    macro = subgroup_table(three_labels, three_predicted, ["a", "b", "c"], {"site": ["X"] * 30})
    x = macro.columns["site"]["X"]
    assert macro.positive is None
    assert math.isclose(x.metrics["sensitivity"].value, (1 + 0.5 + 1) / 3)
    assert math.isclose(x.metrics["sensitivity"].value, x.metrics["balanced_acc"].value)
    assert math.isclose(x.metrics["specificity"].value, (1 + 1 + 15 / 20) / 3)  # c: 5 of 20 others called c


def test_the_intervals_are_seeded():
    labels, predicted, site = two_sites()
    first = subgroup_table(labels, predicted, ["n", "p"], {"site": site}, seed=3)
    assert first == subgroup_table(labels, predicted, ["n", "p"], {"site": site}, seed=3)
    assert (
        first.columns["site"]["B"]
        != subgroup_table(labels, predicted, ["n", "p"], {"site": site}, seed=4).columns["site"]["B"]
    )


def test_metric_names_are_what_mlflow_takes_and_a_column_of_many_values_logs_none():
    assert metric_name("site", "St. Mary's/ICU 2", "acc") == "subgroup_site_St._Mary_s_ICU_2_acc"
    labels = np.array([0, 1] * 60)
    many = [f"v{i}" for i in range(LOGGED_VALUES + 1)] * 6
    table = subgroup_table(
        labels, labels, ["n", "p"], {"scanner": many[: len(labels)], "sex": ["F", "F", "M", "M"] * 30}
    )
    logged = logged_metrics(table)
    assert set(logged) == {f"subgroup_sex_{sex}_{key}" for sex in "FM" for key in table.overall}
    rows = table_columns(table)
    assert len(rows["value"]) == LOGGED_VALUES + 1 + 2 and rows["column"][-1] == "sex"


def test_the_console_names_the_subgroups_below_overall_first():
    labels, predicted, site = two_sites()
    lines = summary_lines(subgroup_table(labels, predicted, ["benign", "malignant"], {"site": site}))
    assert lines[0].startswith("Subgroups (positive class malignant; 95 % CI")
    assert lines[1].startswith("  below overall: site=B (80 images): accuracy 0.6250 (")
    assert lines[2].startswith("  site=A  80 images  acc 0.9250 (")


def test_the_card_has_a_subgroups_section_marking_the_subgroups_below_overall():
    from search.final_model.card import subgroups_section

    labels, predicted, site = two_sites()
    text = subgroups_section(subgroup_table(labels, predicted, ["benign", "malignant"], {"site": site}))
    assert text.startswith("## Subgroups\n\nThe test split per value of each subgroup column the study declared (site)")
    assert "**Below the whole test split** (the interval wholly under its value): site = B (accuracy, " in text
    assert "| B **(below)** | 80 | 0.6250 (" in text and "| A | 80 | 0.9250 (" in text


def test_the_final_record_logs_and_reports_the_subgroups(tmp_path):
    from search.final_model.report import evaluate_test, held_out_record, with_subgroups
    from search.final_model.report import logged_metrics as final_metrics
    from search.final_model.report import summary_lines as final_lines

    labels, predicted, site = two_sites()
    logits = np.eye(2)[predicted] * 3.0
    plain = evaluate_test(logits, labels, ["benign", "malignant"])
    assert "subgroups" not in held_out_record(plain) and with_subgroups(plain, {}, None, ["b", "m"]) is plain
    result = with_subgroups(plain, {"site": site}, None, ["benign", "malignant"])
    assert held_out_record(result)["subgroups"] == json.loads(json.dumps(result.subgroups.to_dict()))
    assert final_metrics(result)["subgroup_site_B_acc"] == 0.625
    assert any(line.startswith("  below overall: site=B") for line in final_lines(result, "val_acc", None, 160))


# ---------------------------------------------------------------- the manifest


@pytest.fixture
def sited(tmp_path: Path) -> tuple[Path, list[str]]:
    """Images of 18 patients, two classes, and their manifest rows 'path,label,group' (no header)."""
    patients = {f"p{n:02d}": ("benign" if n % 2 else "malignant", 2) for n in range(18)}
    return tmp_path, write_patient_images(tmp_path / "scans", patients, size=32)


def with_sites(rows: list[str], *values: str) -> list[str]:
    """Each row with a site (A or B by patient) and any further `values`."""
    return [f"{row},{'AB'[int(row.split(',')[2][1:]) % 3 == 0]}{''.join(',' + v for v in values)}" for row in rows]


def test_declared_columns_are_read_into_each_sample(sited):
    root, rows = sited
    manifest = write_manifest(root / "m.csv", "path,label,group,Site,sex", with_sites(rows, "F"))
    index = index_source(manifest, seed=0, subgroups=("site", "sex"))
    samples = [sample for split in index.splits.values() for sample in split]
    assert {sample.attribute("site") for sample in samples} == {"A", "B"}
    assert all(sample.attributes[1] == ("sex", "F") for sample in samples)
    assert samples[0].attributes[0][0] == "site"  # the declared order
    with pytest.raises(KeyError, match="'scanner' is not a subgroup column of this source"):
        samples[0].attribute("scanner")
    plain = index_source(write_manifest(root / "plain.csv", "path,label,group", rows), seed=0)
    # Nothing declared: the same split, of samples without attributes.
    assert plain.splits == {split: [replace(s, attributes=()) for s in part] for split, part in index.splits.items()}


def test_an_undeclared_column_is_still_refused_naming_subgroups(sited):
    root, rows = sited
    manifest = write_manifest(root / "m.csv", "path,label,group,site", with_sites(rows))
    with pytest.raises(DataError, match=r"unknown column\(s\) 'site'.*declare it: run.py --subgroups NAME"):
        index_source(manifest, seed=0)
    with pytest.raises(DataError, match=r"unknown column\(s\) 'site'"):
        index_source(
            write_manifest(root / "n.csv", "path,label,group,site,sex", with_sites(rows, "F")), 0, subgroups=("sex",)
        )


def test_a_declared_column_missing_or_an_empty_value_is_refused_naming_the_rows(sited):
    root, rows = sited
    manifest = write_manifest(root / "m.csv", "path,label,group,site", with_sites(rows))
    with pytest.raises(DataError, match=r"no column 'sex', which --subgroups declares"):
        index_source(manifest, seed=0, subgroups=("site", "sex"))
    holes = with_sites(rows)
    holes[3] = holes[3].rsplit(",", 1)[0] + ","
    holes[7] = holes[7].rsplit(",", 1)[0] + ", "
    manifest = write_manifest(root / "h.csv", "path,label,group,site", holes)
    with pytest.raises(DataError) as refused:
        index_source(manifest, seed=0, subgroups=("site",))
    assert str(refused.value) == (
        f"2 row(s) of manifest {manifest} have no site (line 5, 9): fill it in, or write 'unknown' where it is not "
        f"known (a subgroup of its own)"
    )


def test_subgroups_of_a_source_without_columns_are_refused():
    with pytest.raises(DataError, match=r"subgroup column\(s\) site \(run.py --subgroups\) are columns of a CSV"):
        index_source("synthetic:3", seed=0, subgroups=("site",))


# ---------------------------------------------------------------- the study's record


def test_the_manifest_s_own_columns_are_the_ones_a_subgroup_may_not_take():
    assert MANIFEST_COLUMNS == COLUMNS  # two homes (records may not import trainables.manifest), kept equal here


@pytest.mark.parametrize(
    "subgroups, problem",
    [
        (("site", "group"), "--subgroups site,group: group is the manifest's own column(s)"),
        (("patient_id",), "--subgroups patient_id: patient_id may name or identify patients"),
        (("patientname",), "patientname may name or identify patients"),
        (("birth_date",), "birth_date may name or identify patients"),
        (("name",), "name may name or identify patients"),
        (("study id",), "study id may name or identify patients"),
        (("site", "site"), "--subgroups site,site: site given twice"),
        (("site", ""), "an empty column name"),
    ],
)
def test_a_subgroup_that_is_no_category_is_refused(subgroups, problem):
    with pytest.raises(ConfigError, match=problem.replace("(", r"\(").replace(")", r"\)")):
        study_config(subgroups=subgroups)


def test_the_subgroups_are_recorded_with_the_study_and_read_back():
    config = study_config(subgroups=("site", "sex", "age_band", "scanner"))
    again = StudyConfig.from_yaml(config.to_yaml(), "study.yaml")
    assert again == config and again.subgroups == ("site", "sex", "age_band", "scanner")
    assert "subgroups:\n- site\n- sex\n" in config.to_yaml()
    assert StudyConfig.from_yaml(study_config().to_yaml(), "study.yaml").subgroups == ()


def test_run_py_refuses_bad_subgroups_in_one_line_before_anything_is_written(tmp_path, monkeypatch, capsys):
    from search.run import main

    def refused(*flags: str) -> str:
        answer = call_main(main, "--model", "cnn", *flags, cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
        return one_line_refusal(answer, "run.py")

    line = refused("--data", "synthetic", "--subgroups", "Patient_ID")
    assert "--subgroups patient_id: patient_id may name or identify patients" in line
    line = refused("--data", "synthetic", "--subgroups", "site", "--no-pretrained")
    assert "subgroup column(s) site (run.py --subgroups) are columns of a CSV manifest, and synthetic is not" in line
    assert not (tmp_path / "mlflow").exists() and not (tmp_path / "ray_results").exists()


def test_resume_refuses_other_subgroups(tmp_path, monkeypatch, capsys):
    from mlflow.tracking import MlflowClient

    from search.run import main

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    config = study_config(
        name="sg", storage_path=str(tmp_path / "ray"), optuna_storage=f"sqlite:///{tmp_path}/o.db", subgroups=("site",)
    )
    client = MlflowClient(uri)
    experiment = client.create_experiment("cnn", artifact_location=(tmp_path / "artifacts").as_uri())
    parent = client.create_run(experiment, run_name="sg", tags={"study": "sg", "model": "cnn"}).info.run_id
    client.log_text(parent, config.to_yaml(), "study.yaml")
    client.set_terminated(parent, "KILLED")
    (tmp_path / "ray" / "sg").mkdir(parents=True)
    (tmp_path / "ray" / "sg" / "tuner.pkl").write_bytes(b"an interrupted study's trial state")
    flags = [
        "--model",
        "cnn",
        "--name",
        "sg",
        "--resume",
        "--tracking-uri",
        uri,
        "--storage-path",
        str(tmp_path / "ray"),
    ]
    env = {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    answer = call_main(
        main, *flags, "--subgroups", "site,sex", cwd=ROOT, monkeypatch=monkeypatch, capsys=capsys, env=env
    )
    assert "subgroups ('site',) (now ('site', 'sex'))" in one_line_refusal(answer, "run.py")
    answer = call_main(main, *flags, "--subgroups", "Site", cwd=ROOT, monkeypatch=monkeypatch, capsys=capsys, env=env)
    assert "no longer holds study 'sg'" in one_line_refusal(answer, "run.py")  # the same: past the settings' check


# ---------------------------------------------------------------- end to end


def script(name: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(ROOT / "search" / name), *args], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=900,
    )  # fmt: skip


@pytest.mark.slow
def test_a_study_with_a_site_column_gets_its_test_results_per_site(tmp_path):
    """run.py --subgroups site on a manifest (32 px, 1 trial, 1 epoch), then final.py: metrics.json, the run's table
    and metrics, the model card and the closing lines give the results per site."""
    root = laid_out_like_the_project(tmp_path / "project")
    patients = {f"p{n:02d}": (("benign", "cyst", "malignant")[n % 3], 3) for n in range(42)}
    rows = write_patient_images(root / "scans", patients, size=32)
    manifest = write_manifest(root / "manifest.csv", "path,label,group,site", with_sites(rows))
    common = ["--no-pretrained", "--tracking-uri", f"sqlite:///{root}/mlflow/mlflow.db"]
    searched = script(
        "run.py", "--model", "vit", "--data", str(manifest), "--subgroups", "site", "--trials", "1", "--epochs", "1",
        "--img-size", "32", "--name", "sites", "--gpus-per-trial", "0", *common, cwd=root,
    )  # fmt: skip
    assert searched.returncode == 0, searched.stdout[-3000:] + searched.stderr[-3000:]
    final = script("final.py", "--study", "sites", "--out", "out", *common, cwd=root)
    assert final.returncode == 0, final.stdout[-3000:] + final.stderr[-3000:]

    record = json.loads((root / "out" / "metrics.json").read_text())["subgroups"]
    assert record["positive"] is None and set(record["columns"]) == {"site"}  # three classes: macro
    sites = record["columns"]["site"]
    assert set(sites) <= {"A", "B"} and sum(site["images"] for site in sites.values()) == len(
        json.loads((root / "out" / "splits.json").read_text())["test"]
    )
    assert set(next(iter(sites.values()))["metrics"]) == {"acc", "balanced_acc", "sensitivity", "specificity"}
    assert "## Subgroups" in (root / "out" / "model_card.md").read_text()
    assert "Subgroups (sensitivity, specificity: macro over classes; 95 % CI within each subgroup):" in final.stdout

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root}/mlflow/mlflow.db")
    run = client.get_run(json.loads((root / "out" / "metrics.json").read_text())["mlflow"]["run_id"])
    assert {f"subgroup_site_{site}_acc" for site in sites} <= set(run.data.metrics)
    table = json.loads(Path(client.download_artifacts(run.info.run_id, SUBGROUP_TABLE, str(tmp_path))).read_text())
    assert table["columns"][:3] == ["column", "value", "images"] and len(table["data"]) == len(sites)
