"""--objective accuracy,COST: a multi-objective study, its Pareto front on the study's run, and a point retrained."""

from __future__ import annotations

import csv
import time
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from helpers import ROOT, run_script, study_config
from helpers.cli import call_main, heavy_modules_loaded, one_line_refusal
from helpers.cuda import requires_cuda
from optuna.trial import TrialState
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from search.records.study_config import ConfigError, StudyConfig
from search.study.pareto import (
    Point,
    Tradeoff,
    dominates,
    front_lines,
    metric_only,
    pareto_front,
    write_front_plot,
    write_front_table,
)
from search.study.report import importances
from search.study.spaces import load_space
from search.study.tuning import make_scheduler, make_searcher
from trainables.config import COSTS, OBJECTIVES, SpeedOptions
from trainables.costs import latency_cost, memory_cost, parameter_cost
from trainables.models import ModelSpec, build_model, count_parameters

LATENCY = COSTS["latency"]

# ---------------------------------------------------------------- the front, on made-up points


def points(*rows: tuple[str, float, float]) -> list[Point]:
    return [Point(label, score, cost) for label, score, cost in rows]


def test_a_dominated_point_is_left_off_the_front_and_ties_stay_on_it():
    made_up = points(
        ("t00", 0.90, 30.0),  # the most accurate
        ("t01", 0.80, 10.0),  # cheaper, less accurate: on the front too
        ("t02", 0.75, 20.0),  # worse and dearer than t01: dominated
        ("t03", 0.90, 30.0),  # t00's equal: neither dominates the other
        ("t04", 0.80, 12.0),  # as accurate as t01 and dearer: dominated
    )
    assert [p.label for p in pareto_front(made_up, "max")] == ["t01", "t00", "t03"]  # cheapest first
    t01, t02 = made_up[1], made_up[2]
    assert dominates(t01, t02, "max") and not dominates(t02, t01, "max")
    assert not dominates(made_up[0], made_up[3], "max")
    # val_loss is minimised: the lowest loss wins, so the roles turn.
    assert [p.label for p in pareto_front(points(("a", 0.2, 5.0), ("b", 0.1, 5.0)), "min")] == ["b"]


def test_the_front_is_optunas_own_best_trials():
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(40):
        trial = study.ask()
        study.tell(trial, [trial.suggest_float("acc", 0, 1), trial.suggest_float("ms", 1, 50)])
    made = [Point(f"t{t.number:02d}", t.values[0], t.values[1]) for t in study.trials]
    assert {p.label for p in pareto_front(made, "max")} == {f"t{t.number:02d}" for t in study.best_trials}


def test_the_front_is_written_as_a_table_a_plot_and_closing_lines(tmp_path):
    tradeoff = Tradeoff(
        "val_acc",
        "max",
        LATENCY,
        (
            Point("t00", 0.9, 30.0, "run0", {"lr": 0.001, "vit_depth": 12}),
            Point("t01", 0.8, 10.0, "run1", {"lr": 0.002, "vit_depth": 3}),
            Point("t02", 0.7, 20.0, "run2", {"lr": 0.003, "vit_depth": 6}),
        ),
    )
    table = list(csv.DictReader(write_front_table(tradeoff, "s", tmp_path / "front.csv").open()))
    assert [row["trial"] for row in table] == ["t01", "t00"]
    assert table[0]["latency_ms"] == "10" and table[0]["vit_depth"] == "3"
    assert table[0]["retrain"] == "python search/final.py --run-id run1"
    plot = write_front_plot(tradeoff, "s (vit)", tmp_path / "front.png")
    assert plot.stat().st_size > 10_000
    lines = front_lines(tradeoff, "s")
    assert "2 of 3 completed trials" in lines[0]
    assert lines[1].split() == ["t01", "val_acc", "0.8000", "10", "ms"]
    assert lines[-1].startswith("Retrain a point: python search/final.py --study s --trial t01")


def test_plots_and_importances_of_a_multi_objective_study_are_of_its_metric():
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(8):
        trial = study.ask()
        lr = trial.suggest_float("lr", 1e-4, 1e-2, log=True)
        depth = trial.suggest_int("vit_depth", 1, 12)
        study.tell(trial, [lr * 50, float(depth)])
    single = metric_only(study)
    assert single.direction == optuna.study.StudyDirection.MAXIMIZE
    assert [t.value for t in single.trials] == [t.values[0] for t in study.trials]
    assert set(importances(single)) == {"lr", "vit_depth"}


# ---------------------------------------------------------------- the flag and the record


def test_objective_values_are_checked_by_the_record_naming_the_flag():
    for objective in OBJECTIVES[:3]:
        assert study_config(objective=objective).objective == objective
    with pytest.raises(ConfigError, match=r"--objective 'accuracy,speed': choose one of 'accuracy', "):
        study_config(objective="accuracy,speed")
    # Peak memory is a CUDA counter: trials on the CPU cannot measure it.
    with pytest.raises(ConfigError, match="--objective accuracy,memory: peak_memory_mb is measured on CUDA only"):
        study_config(objective="accuracy,memory", gpus_per_trial=0.0)
    assert study_config(objective="accuracy,memory", gpus_per_trial=0.5).cost == COSTS["memory"]


def test_a_study_yaml_from_before_the_flag_loads_as_accuracy_alone():
    raw = yaml.safe_load(study_config().to_yaml())
    del raw["objective"]
    assert StudyConfig.from_yaml(yaml.safe_dump(raw), "study.yaml").objective == "accuracy"


BAD_OBJECTIVES = [
    (["--objective", "accuracy,speed"], "--objective 'accuracy,speed': choose one of"),
    (["--objective", "accuracy,memory", "--gpus-per-trial", "0"], "peak_memory_mb is measured on CUDA only"),
]


@pytest.mark.parametrize("flags, message", BAD_OBJECTIVES)
def test_a_bad_objective_is_one_line_exit_2_before_anything_loads(tmp_path, flags, message, monkeypatch, capsys):
    from search.run import main

    args = ("--model", "vit", "--data", "synthetic", "--no-pretrained", *flags)
    answer = call_main(main, *args, cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert message in one_line_refusal(answer, "run.py")
    assert not (tmp_path / "mlflow").exists()


def test_a_bad_objective_is_refused_before_torch_and_ray_load(tmp_path):
    """At once (a timing said so once; a busy machine made it flaky)."""
    calls = [["--model", "vit", "--data", "synthetic", "--no-pretrained", *flags] for flags, _ in BAD_OBJECTIVES]
    assert heavy_modules_loaded("search.run", tmp_path, *calls) == [(2, [])] * len(calls)


def test_peak_memory_is_refused_where_auto_gives_the_trials_no_gpu():
    from search.errors import UsageError
    from search.study.driver import resolved_config
    from search.study.resources import GpuShare

    config = study_config(objective="accuracy,memory", gpus_per_trial=None)  # 'auto', not measured yet
    with pytest.raises(UsageError, match="peak_memory_mb is measured on CUDA only"):
        resolved_config(config, GpuShare(gpus_per_trial=0.0, max_concurrent=2))
    assert resolved_config(config, GpuShare(gpus_per_trial=0.5, max_concurrent=2)).gpus_per_trial == 0.5


def test_final_refuses_a_trial_without_its_study(tmp_path, monkeypatch, capsys):
    from search.final import main

    answer = call_main(main, "--run-id", "abc", "--trial", "t01", cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert answer.code == 2
    assert answer.err.strip().splitlines() == [
        "search/final.py: error: --trial t01 names a trial of a study: give --study NAME too"
    ]


# ---------------------------------------------------------------- the searcher and the scheduler

SPACES = ROOT / "spaces"


def result(acc: float, epoch: int, latency: float, finished: bool = False) -> dict:
    return {"val_acc": acc, "latency_ms": latency, "epoch": epoch, "training_iteration": epoch, "finished": finished}


def test_a_multi_objective_searcher_tells_optuna_the_best_score_and_the_cost():
    config = study_config(model="vit", space=str(SPACES / "vit.yaml"), objective="accuracy,latency")
    searcher = make_searcher(load_space(SPACES / "vit.yaml", "vit"), config)
    study = searcher.study
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    assert study.metric_names == ["val_acc", "latency_ms"]
    for trial_id in ("a", "b"):
        searcher.suggest(trial_id)
    searcher.on_trial_result("a", result(0.5, 1, 4.0))
    searcher.on_trial_result("a", result(0.8, 2, 4.0))
    searcher.on_trial_complete("a", result(0.7, 3, 4.0, finished=True))
    searcher.on_trial_result("b", result(0.4, 1, 9.0))
    searcher.on_trial_complete("b", result(0.4, 1, 9.0), error=True)
    completed, crashed = study.trials
    assert completed.state == TrialState.COMPLETE and completed.values == [0.8, 4.0]
    assert completed.intermediate_values == {}  # Optuna refuses them in a multi-objective study
    assert crashed.state == TrialState.FAIL


def test_asha_stops_trials_of_one_objective_and_no_scheduler_those_of_two():
    assert isinstance(make_scheduler(study_config(), 3), ASHAScheduler)
    assert type(make_scheduler(study_config(objective="accuracy,params"), 3)) is FIFOScheduler


# ---------------------------------------------------------------- what a trial measures


def test_a_trial_measures_its_model_s_costs_on_its_device():
    model = build_model(ModelSpec("vit", 3, 32, pretrained=False, vit_depth=1))
    assert parameter_cost(model) == {"params_m": count_parameters(model) / 1e6}
    latency = latency_cost(model, 32, torch.device("cpu"), SpeedOptions())
    assert set(latency) == {"latency_ms"} and 0 < latency["latency_ms"] < 1000
    assert memory_cost(torch.device("cpu")) == {}  # CUDA's counter only


# ---------------------------------------------------------------- a real study, end to end

TRIALS = 3


@pytest.fixture(scope="module")
def latency_study(tmp_path_factory) -> dict:
    """A vit study of 3 trials at smoke size that trades val_acc against latency (about a minute on 2 cores)."""
    folder = tmp_path_factory.mktemp("objective")
    uri = f"sqlite:///{folder}/mlflow.db"
    args = ["--model", "vit", "--trials", str(TRIALS), "--epochs", "1", "--smoke", "--no-pretrained"]
    args += ["--data", "synthetic:3", "--objective", "accuracy,latency", "--name", "mo", "--tracking-uri", uri]
    args += ["--storage-path", str(folder / "ray"), "--cache-dir", str(folder / "cache")]
    start = time.perf_counter()
    ran = run_script("run.py", *args, cwd=folder)
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("vit").experiment_id], "tags.study = 'mo'")
    parent = next(run for run in runs if "mlflow.parentRunId" not in run.data.tags)
    return {
        "folder": folder,
        "uri": uri,
        "stdout": ran.stdout,
        "seconds": time.perf_counter() - start,
        "client": client,
        "parent": parent,
        "children": [run for run in runs if run.data.tags.get("mlflow.parentRunId") == parent.info.run_id],
        "optuna": optuna.load_study(study_name="mo", storage=f"sqlite:///{folder}/optuna.db"),
    }


@pytest.mark.slow
def test_the_optuna_study_has_two_directions_and_its_front_is_not_dominated(latency_study):
    study = latency_study["optuna"]
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    completed = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(completed) == TRIALS  # no ASHA: every trial ends itself
    front = study.best_trials
    assert front
    for chosen in front:
        beaten = [t for t in completed if dominated(chosen.values, t.values)]
        assert not beaten, f"trial {chosen.number} is dominated by {[t.number for t in beaten]}"


def dominated(values: list[float], by: list[float]) -> bool:
    """(val_acc, latency) `values` is beaten by `by`: no worse on both, better on one."""
    return by[0] >= values[0] and by[1] <= values[1] and (by[0] > values[0] or by[1] < values[1])


@pytest.mark.slow
def test_every_trial_run_records_its_costs(latency_study):
    client, children = latency_study["client"], latency_study["children"]
    assert len(children) == TRIALS
    for child in children:
        assert child.data.tags["trial_status"] == "completed"
        assert 0.1 < child.data.metrics["params_m"] < 10  # a vit of 1 to 12 blocks
        assert child.data.metrics["latency_ms"] > 0
        assert [m.step for m in client.get_metric_history(child.info.run_id, "latency_ms")] == [1]


@pytest.mark.slow
def test_the_front_is_on_the_studys_run_and_in_its_closing_lines(latency_study, tmp_path):
    client, parent = latency_study["client"], latency_study["parent"]
    artifacts = {item.path for item in client.list_artifacts(parent.info.run_id)}
    assert {"pareto_front.png", "pareto_front.csv"} <= artifacts
    local = Path(client.download_artifacts(parent.info.run_id, "pareto_front.csv", str(tmp_path)))
    rows = list(csv.DictReader(local.open()))
    front = {t.user_attrs["ray_trial_id"] for t in latency_study["optuna"].best_trials}
    labels = {c.data.tags["ray_trial_id"]: c.data.tags["trial"] for c in latency_study["children"]}
    assert {row["trial"] for row in rows} == {labels[trial_id] for trial_id in front}
    runs = {c.info.run_id for c in latency_study["children"]}
    assert all(row["run_id"] in runs and row["retrain"].endswith(row["run_id"]) for row in rows)
    stdout = latency_study["stdout"]
    assert "Pareto front: val_acc against inference latency" in stdout
    assert f"Retrain a point: python search/final.py --study mo --trial {rows[0]['trial']}" in stdout
    assert "## Pareto front" in parent.data.tags["mlflow.note.content"]
    assert "No ASHA" in parent.data.tags["mlflow.note.content"]


@pytest.mark.slow
def test_final_retrains_a_point_of_the_front_by_its_label(latency_study):
    client, parent = latency_study["client"], latency_study["parent"]
    folder = latency_study["folder"]
    text = Path(client.download_artifacts(parent.info.run_id, "pareto_front.csv", str(folder / "front"))).read_text()
    chosen = next(csv.DictReader(text.splitlines()))
    args = ["--study", "mo", "--trial", chosen["trial"], "--tracking-uri", latency_study["uri"]]
    retrained = run_script("final.py", *args, "--cache-dir", str(folder / "cache"), cwd=folder)
    assert retrained.returncode == 0, retrained.stdout[-3000:] + retrained.stderr[-3000:]
    final = client.search_runs([parent.info.experiment_id], "tags.role = 'final' and tags.study = 'mo'")
    assert len(final) == 1 and "test_acc" in final[0].data.metrics
    assert float(final[0].data.params["lr"]) == pytest.approx(float(chosen["lr"]))


@requires_cuda
def test_peak_memory_is_the_trial_process_s_cuda_peak():
    device = torch.device("cuda")
    torch.cuda.reset_peak_memory_stats(device)
    block = torch.empty(64 * 2**20, dtype=torch.uint8, device=device)
    peak = memory_cost(device)["peak_memory_mb"]
    del block
    assert peak >= 64
