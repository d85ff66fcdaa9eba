"""compare.py: three tiny studies, their retrains, a reference, one comparison run; rerun, resume, --studies.

The end-to-end module fixture runs the whole command once from a folder laid out like
the project (slow: three studies). The fast tests check what needs no study: the
arguments handed on to run.py, the refusals, the predictions record.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from helpers import ROOT, run_script
from helpers.cli import call_main, one_line_refusal

from search.compare import build_compare_parser, forwarded_argv

UNBUFFERED = {**os.environ, "PYTHONUNBUFFERED": "1"}
NAME = "cmp"
REFERENCE = "test_resnet"  # a tiny timm model: the reference path, not a large model's cost
COMMAND = (
    "--data",
    "synthetic:3",
    "--trials",
    "1",
    "--epochs",
    "1",
    "--smoke",
    "--no-pretrained",
    "--resamples",
    "1000",
)


# ---------------------------------------------------------------- fast: arguments and records


def parsed(*argv: str) -> tuple[argparse.Namespace, list[argparse.Action]]:
    parser, forwarded = build_compare_parser()
    return parser.parse_args(list(argv)), forwarded


def test_the_study_flags_given_are_handed_on_to_run_py_and_the_comparison_s_own_are_not():
    args, forwarded = parsed(
        "--data", "synthetic:3", "--trials", "4", "--smoke", "--no-amp", "--weights", "a=1", "--weights", "b=2",
        "--gpus-per-trial", "0.5", "--reference", "resnet50", "--name", "x", "--resamples", "3000",
    )  # fmt: skip
    argv = forwarded_argv(args, forwarded)
    assert argv == [
        "--trials", "4", "--data", "synthetic:3", "--weights", "a=1", "--weights", "b=2", "--smoke", "--no-amp",
        "--gpus-per-trial", "0.5",
    ]  # fmt: skip
    assert not {"--reference", "--name", "--resamples", "--model", "--resume"} & set(argv)
    # What run.py makes of them is what the user asked for.
    from search.run import build_parser

    study = build_parser().parse_args(["--model", "cnn", *argv])
    assert (study.trials, study.smoke, study.amp, study.gpus_per_trial) == (4, True, False, 0.5)
    assert study.weights == ["a=1", "b=2"]


def test_defaults_are_not_handed_on():
    args, forwarded = parsed()
    assert forwarded_argv(args, forwarded) == []


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--resamples", "10"], "--resamples 10: use at least 1000"),
        (["--studies", "only-one"], "--studies needs at least two studies"),
        (["--models", "cnn"], "--models needs at least two different models"),
        (["--name", "bad name"], "bad name"),
        (["--studies", "nope-a", "nope-b"], "holds no MLflow store"),
        (["--img-size", "40"], "not a multiple of the ViT patch"),  # vit's check, before cnn's study starts
        (["--data", "missing-folder"], "missing-folder"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, argv, message, monkeypatch, capsys):
    """compare.py's main() in this process; the test after the next runs one as a user does."""
    from search.compare import main

    shutil.copytree(ROOT / "spaces", tmp_path / "spaces")
    args = ("--smoke", "--no-pretrained", "--data", "synthetic:3", *argv)
    answer = call_main(main, *args, cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert message in one_line_refusal(answer, "compare.py")
    assert not (tmp_path / "mlflow").exists() and not (tmp_path / "ray_results").exists()
    assert not (tmp_path / "comparisons").exists()


def test_an_unknown_reference_model_is_refused_before_anything_runs(tmp_path, monkeypatch, capsys):
    from search.compare import main

    shutil.copytree(ROOT / "spaces", tmp_path / "spaces")
    args = ("--smoke", "--no-pretrained", "--data", "synthetic:3", "--reference", "convnxt_tiny")
    answer = call_main(main, *args, cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert "convnxt_tiny" in one_line_refusal(answer, "compare.py")
    assert not (tmp_path / "mlflow").exists()


def test_a_refusal_is_one_line_on_stderr_exit_2_without_a_traceback_from_the_command_line(tmp_path):
    """The contract as a user meets it, compare.py in its own process."""
    result = run_script("compare.py", "--smoke", "--resamples", "10", cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("search/compare.py: error: "), result.stderr
    assert "--resamples 10: use at least 1000" in lines[0] and "Traceback" not in result.stderr
    assert not (tmp_path / "mlflow").exists() and not (tmp_path / "comparisons").exists()


# ---------------------------------------------------------------- slow: the whole command


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """The whole command, as a user might run it: stopped with Ctrl-C in its first study, then run again."""
    root = tmp_path_factory.mktemp("compare")
    shutil.copytree(ROOT / "spaces", root / "spaces")
    command = [sys.executable, str(ROOT / "search" / "compare.py"), *COMMAND, "--name", NAME, "--reference", REFERENCE]
    interrupted = subprocess.Popen(
        command, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=UNBUFFERED
    )
    assert interrupted.stdout is not None
    before = []
    for line in iter(interrupted.stdout.readline, ""):  # until the first study's first trial is training
        before.append(line)
        if line.startswith("t00 started"):
            break
    interrupted.send_signal(signal.SIGINT)  # as a terminal's Ctrl-C: to compare.py alone
    stopped = "".join(before) + interrupted.communicate(timeout=300)[0]
    assert interrupted.returncode == 130, stopped[-3000:]

    started = time.perf_counter()
    result = run_script("compare.py", *COMMAND, "--name", NAME, "--reference", REFERENCE, cwd=root, timeout=1500)
    seconds = time.perf_counter() - started
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    print(f"\ncompare.py, three smoke studies + retrains + reference, after Ctrl-C: {seconds:.0f} s")
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{root}/mlflow/mlflow.db"
    return argparse.Namespace(root=root, stopped=stopped, result=result, client=MlflowClient(uri), uri=uri)


def every_run(client) -> list:
    ids = [e.experiment_id for e in client.search_experiments()]
    return list(client.search_runs(ids, max_results=10_000))


def by_role(client, role: str) -> list:
    return [run for run in every_run(client) if run.data.tags.get("role") == role]


def study_parents(client) -> list:
    return [
        run
        for run in every_run(client)
        if "study" in run.data.tags and "mlflow.parentRunId" not in run.data.tags and "role" not in run.data.tags
    ]


@pytest.mark.slow
def test_one_command_runs_three_studies_retrains_each_and_logs_one_comparison(compared):
    client = compared.client
    parents = study_parents(client)
    assert sorted(run.data.tags["study"] for run in parents) == [f"{NAME}-cnn", f"{NAME}-hybrid", f"{NAME}-vit"]
    assert all(run.info.status == "FINISHED" for run in parents)
    finals = by_role(client, "final")
    assert sorted(run.data.tags["study"] for run in finals) == sorted(run.data.tags["study"] for run in parents)
    (reference,) = by_role(client, "reference")
    assert reference.data.tags["reference_model"] == REFERENCE and reference.data.tags["comparison"] == NAME
    assert "registered_model" not in reference.data.tags  # compared, not shipped

    (comparison,) = by_role(client, "comparison")
    tags = comparison.data.tags
    assert comparison.info.status == "FINISHED" and tags["comparison"] == NAME
    assert {tags[f"study.{m}"] for m in ("cnn", "vit", "hybrid")} == {run.data.tags["study"] for run in parents}
    assert {tags[f"final_run.{m}"] for m in ("cnn", "vit", "hybrid", REFERENCE)} == {
        run.info.run_id for run in [*finals, reference]
    }
    artifacts = {item.path for item in client.list_artifacts(comparison.info.run_id)}
    assert {"report.md", "report.txt", "comparison.json", "accuracy.png", "accuracy_vs_latency.png"} <= artifacts
    assert "confusion_matrices.png" in artifacts
    note = tags["mlflow.note.content"]
    assert note.startswith(f"# Model comparison: {NAME}\n\n**Recommendation: Pick ")  # the answer first
    assert "## Runs" in note and ".png" not in note  # links to the runs, not to plots it cannot show
    for run in [*parents, *finals, reference]:
        assert f"(#/experiments/{run.info.experiment_id}/runs/{run.info.run_id})" in note
    (dataset,) = comparison.inputs.dataset_inputs  # the studies' data, in the Dataset column
    assert dataset.dataset.name == "synthetic:3"

    metrics = comparison.data.metrics
    for model in ("cnn", "vit", "hybrid", REFERENCE):
        low, value, high = (metrics[f"{model}/test_acc{s}"] for s in ("_low", "", "_high"))
        assert 0 <= low <= value <= high <= 1, model
        assert metrics[f"{model}/latency_ms_batch1"] > 0 and metrics[f"{model}/parameters"] > 0
    # Each model's point estimate is its final run's own test accuracy.
    for run in [*finals, reference]:
        label = run.data.tags.get("study", f"x-{REFERENCE}").split("-")[-1]
        assert metrics[f"{label}/test_acc"] == pytest.approx(run.data.metrics["test_acc"]), label


@pytest.mark.slow
def test_ctrl_c_stops_the_comparison_and_the_same_command_continues_it(compared):
    assert "interrupted; finished studies and retrains are kept: run the same command again" in compared.stopped
    assert f"resuming study {NAME}-cnn" in compared.result.stdout  # the stopped study, continued
    assert f"starting study {NAME}-vit" in compared.result.stdout
    assert compared.result.stdout.count("Test split:") == 4  # three retrains and the reference, once each


@pytest.mark.slow
def test_the_report_is_printed_written_and_holds_every_model_pair_and_cost(compared):
    stdout = compared.result.stdout
    assert "Pick " in stdout and "McNemar" in stdout
    out = compared.root / "comparisons" / NAME
    record = json.loads((out / "comparison.json").read_text())
    assert [m["name"] for m in record["models"]] == ["cnn", "vit", "hybrid", REFERENCE]
    assert record["test_images"] == 3 * 8 and record["resamples"] == 1000
    pairs = {(p["a"], p["b"]) for p in record["pairs"]}
    assert len(pairs) == 3 + 3  # the three searched pairs, then the reference against each
    for model in record["models"]:
        assert model["costs"]["device"] == "cpu" and model["costs"]["peak_train_memory"] is None
        assert set(model["costs"]["latency_ms"]) == {"1", "32"}
        if model["reference"]:
            assert model["search"] is None
        else:
            assert model["search"]["trials"] == 1 and model["search"]["wall_seconds"] > 0
            assert model["search"]["gpu_hours"] == 0  # a CPU study has no GPU share
    for name in ("report.md", "accuracy.png", "accuracy_vs_latency.png", "confusion_matrices.png"):
        assert (out / name).stat().st_size > 0


@pytest.mark.slow
def test_running_the_same_command_again_redoes_nothing(compared):
    before = {run.info.run_id for run in every_run(compared.client)}
    started = time.perf_counter()
    again = run_script("compare.py", *COMMAND, "--name", NAME, "--reference", REFERENCE, cwd=compared.root, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert {run.info.run_id for run in every_run(compared.client)} == before
    assert "is complete" in again.stdout and "Pick " in again.stdout
    print(f"\ncompare.py again, everything done: {time.perf_counter() - started:.0f} s")


@pytest.mark.slow
def test_a_comparison_missing_one_retrain_redoes_that_retrain_only(compared):
    """As after a kill during vit's retrain: the studies stand, cnn's and hybrid's retrains are reused."""
    client = compared.client
    (vit_final,) = [run for run in by_role(client, "final") if run.data.tags["study"] == f"{NAME}-vit"]
    client.set_terminated(vit_final.info.run_id, "KILLED")
    trials_before = len(every_run(client))
    resumed = run_script("compare.py", *COMMAND, "--name", NAME, cwd=compared.root, timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    finals = by_role(client, "final")
    assert len(finals) == 4 and sum(run.data.tags["study"] == f"{NAME}-vit" for run in finals) == 2
    assert len(every_run(client)) == trials_before + 2  # one retrain, one comparison run: no study ran
    assert "reusing retrain" in resumed.stdout and "starting study" not in resumed.stdout


@pytest.mark.slow
def test_studies_already_run_are_compared_with_their_retrains_reused(compared):
    client = compared.client
    finals_before = len(by_role(client, "final"))
    result = run_script(
        "compare.py", "--studies", f"{NAME}-cnn", f"{NAME}-vit", "--name", "two", "--resamples", "1000",
        cwd=compared.root, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert len(by_role(client, "final")) == finals_before
    (two,) = [run for run in by_role(client, "comparison") if run.data.tags["comparison"] == "two"]
    record = json.loads((compared.root / "comparisons" / "two" / "comparison.json").read_text())
    assert [m["name"] for m in record["models"]] == ["cnn", "vit"] and len(record["pairs"]) == 1
    assert two.data.tags["study.cnn"] == f"{NAME}-cnn"
