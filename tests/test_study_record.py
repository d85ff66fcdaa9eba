"""A study's MLflow record explains itself: read back through MLflow's and Optuna's own APIs.

The session's vit --smoke study (tests/helpers/smoke_study.py) is the one read back here: run as a
user runs it, five trials one at a time, so that ASHA prunes one and four complete, every time:
enough for the parameter importances and the plots that compare trials. A one-trial --verbose study
shows Ray's own output; refused starts show that a study's name is checked in the MLflow store and
the Optuna database.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
import yaml
from helpers import ROOT, study_config
from helpers.smoke_study import (
    CLASSES,
    MODEL,
    NAME,
    OUTCOMES,
    SMOKE_STUDY,
    TRIALS,
    Record,
    project_folder,
    read_record,
    run_in,
    trial_of,
)
from helpers.winners import a_winner
from optuna.trial import TrialState

from search.records.study_config import SMOKE
from search.study.spaces import load_space
from trainables.config import Hyperparameters

OPTUNA_STATES = {"completed": TrialState.COMPLETE, "pruned": TrialState.PRUNED, "failed": TrialState.FAIL}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CHANCE = "(chance 0.0909)"
"""1/11: guessing on the 11 synthetic classes."""
NOT_QUIET = ("Configuration for experiment", "View detailed results", "INFO mlflow")
"""Ray's and MLflow's own output, which the console shows only with --verbose."""


@pytest.fixture
def study(smoke_study) -> Record:
    """The session's study, read only."""
    return smoke_study


@pytest.fixture(scope="module")
def lone_study(tmp_path_factory) -> Record:
    """The cheapest study there is, with --verbose: one trial of one epoch."""
    root = project_folder(tmp_path_factory, "lone")
    result, seconds = run_in(root, *SMOKE_STUDY, "--trials", "1", "--epochs", "1", "--name", "lone", "--verbose")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return read_record(root, "lone", result.stdout + result.stderr, seconds)


def compared(study: Record) -> None:
    """This module's study needs two completed trials, or there is nothing to compare them by."""
    completed = sum(run.data.tags["trial_status"] == "completed" for run in study.children)
    assert completed >= 2, f"only {completed} of {TRIALS} trials completed: the study is too small to compare trials"


def searched_knobs() -> set[str]:
    """The knobs spaces/vit.yaml searches (not those it fixes)."""
    return set(load_space(ROOT / "spaces" / f"{MODEL}.yaml", MODEL).searched)


# ---------------------------------------------------------------- the trials' runs


def test_a_trial_run_is_named_by_its_number_and_once_ended_by_its_outcome(study):
    labels = [trial_of(run) for run in study.children]
    assert labels == [f"t{number:02d}" for number in range(TRIALS)]
    for run in study.children:
        outcome = run.data.tags["trial_status"]
        assert outcome in OUTCOMES and run.info.status == ("FAILED" if outcome == "failed" else "FINISHED")
        won = ", best" if run.info.run_id == study.winner_run.info.run_id else ""  # the winner, as the table shows it
        assert run.info.run_name == f"{trial_of(run)} {outcome}{won}"
    # The runs table shows the start of a name first: there, every trial's name differs.
    assert len({run.info.run_name[:3] for run in study.children}) == TRIALS


def test_a_trial_run_logs_its_best_score_at_the_epochs_where_it_improved(study):
    for run in study.children:
        val_acc = study.history(run, "val_acc")
        improved, best = [], float("-inf")
        for epoch, value in val_acc:
            if value > best:
                improved.append((epoch, value))
                best = value
        assert study.history(run, "best_val_acc") == improved, trial_of(run)
        assert run.data.metrics["best_val_acc"] == max(value for _, value in val_acc)


def test_every_run_of_the_study_has_the_data_as_its_dataset_input(study):
    expected_counts = {f"{split}_images": CLASSES * count for split, count in SMOKE.per_class.items()}
    digests = set()
    for run in [study.parent, *study.children]:
        (data,) = run.inputs.dataset_inputs
        assert (data.dataset.name, data.dataset.source_type) == ("synthetic", "code")
        assert [(tag.key, tag.value) for tag in data.tags] == [("mlflow.data.context", "train")]
        profile = json.loads(data.dataset.profile)
        assert profile == {"num_classes": CLASSES, "num_images": sum(expected_counts.values()), **expected_counts}
        digests.add(data.dataset.digest)
    assert len(digests) == 1 and digests != {""}


# ---------------------------------------------------------------- the study's run


def test_the_experiment_opens_on_the_training_view_with_the_studys_shared_view(study):
    tags = study.experiment.tags
    assert tags["mlflow.experimentKind"] == "custom_model_development"
    view = json.loads(tags[f"mlflow.sharedViewState.{NAME}"])
    assert view["searchFilter"] == f"tags.study = '{NAME}'"
    assert view["orderByKey"] == "metrics.`best_val_acc`" and view["orderByAsc"] is False
    assert {f"params.`{knob}`" for knob in searched_knobs()} <= set(view["selectedColumns"])
    assert "metrics.`best_val_acc`" in view["selectedColumns"]
    # The view's filter is one MLflow's search takes, and it finds this study's runs, all of them.
    found = study.client.search_runs([study.experiment.experiment_id], filter_string=view["searchFilter"])
    assert {run.info.run_id for run in found} == {run.info.run_id for run in [study.parent, *study.children]}
    # Its charts draw what the runs hold: the trials' epochs first, then the importances of the study's run.
    charts = [(chart["type"], chart["metricKey"]) for chart in view["compareRunCharts"]]
    assert charts[:2] == [("LINE", "val_acc"), ("LINE", "best_val_acc")]
    epoch_keys = set().union(*(run.data.metrics for run in study.children))
    assert {key for kind, key in charts if kind == "LINE"} <= epoch_keys
    importances = {key for key in study.parent.data.metrics if key.startswith("importance/")}
    assert {key for kind, key in charts if kind == "BAR"} == importances
    # The URL that the console prints opens that view.
    experiment_id = study.experiment.experiment_id
    url = f"#/experiments/{experiment_id}/runs?viewStateShareKey={NAME}&workflowType=machine_learning"
    assert f"then open http://127.0.0.1:5000/{url}" in study.console


def test_the_view_shows_the_best_score_first_the_winner_by_its_name_and_the_final_runs_score(study):
    """What the runs table shows in a 1600 px window beside MLflow's Assistant panel: the run's name, then the best
    score (no Dataset column of 300 px before it), then a final retrain's test score."""
    view = json.loads(study.experiment.tags[f"mlflow.sharedViewState.{NAME}"])
    first = ["metrics.`best_val_acc`", "metrics.`test_acc`", "attributes.`Models`"]
    assert view["selectedColumns"][:3] == view["columnOrder"][:3] == first
    assert not [name for name in view["selectedColumns"] if "Dataset" in name]
    assert view["columnWidths"] == {"metrics.`best_val_acc`": 136}
    # A shared view drops what it cannot keep (MLflow 3.17): rows neither pinned nor expanded by it.
    assert not {"runsExpanded", "runsPinned"} & set(view)
    names = [run.info.run_name for run in study.children]
    winner = study.winner_run
    assert [name for name in names if name.endswith(", best")] == [
        f"{trial_of(winner)} {winner.data.tags['trial_status']}, best"
    ]
    # The winner's name, not Ray's id, wherever a person reads it.
    label = trial_of(study.winner_run)
    assert study.winner["trial"] == label and study.parent.data.tags["best_trial"] == label
    assert study.parent.data.tags["best_trial_id"] == study.winner["trial_id"]


def test_the_winner_is_a_logged_model_of_the_studys_run(study):
    parent_id = study.parent.info.run_id
    assert {a.path for a in study.client.list_artifacts(parent_id, "best")} == {"best/best_config.yaml"}
    (model,) = study.client.search_logged_models([study.experiment.experiment_id])
    assert model.name == f"{NAME}-best" and model.source_run_id == parent_id and model.status == "READY"
    assert [output.model_id for output in study.parent.outputs.model_outputs] == [model.model_id]
    assert model.tags["trial"] == trial_of(study.winner_run)
    assert {a.path for a in study.client.list_logged_model_artifacts(model.model_id)} == {
        "best_model.pt",
        "best_config.yaml",
    }
    # Its files lie beside the store; its config is the run's.
    import mlflow

    assert model.artifact_location.startswith((study.root / "mlflow" / "artifacts").as_uri())
    local = Path(mlflow.artifacts.download_artifacts(model.artifact_location, dst_path=str(study.root / "model")))
    assert yaml.safe_load((local / "best_config.yaml").read_text()) == study.winner
    assert (local / "best_model.pt").stat().st_size > 0


def test_the_studys_run_has_the_best_score_its_time_and_the_importances(study):
    metrics = study.parent.data.metrics
    assert metrics["best_val_acc"] == study.winner["best_value"] == study.winner_run.data.metrics["best_val_acc"]
    assert metrics["best_val_acc"] == max(run.data.metrics["best_val_acc"] for run in study.children)
    assert 0 < metrics["elapsed_s"] < study.seconds
    compared(study)
    importances = {key.removeprefix("importance/"): v for key, v in metrics.items() if key.startswith("importance/")}
    # The knobs, and the on/off choices of those with `or:` (rotation_deg_on: does rotating at all matter?)
    assert importances and set(importances) <= load_space(ROOT / "spaces" / f"{MODEL}.yaml", MODEL).optuna_names
    assert all(value >= 0 for value in importances.values())
    assert sum(importances.values()) == pytest.approx(1.0, abs=1e-6)


def test_the_note_says_how_the_study_went_and_how_to_retrain_its_winner(study):
    note = study.parent.data.tags["mlflow.note.content"]
    lines = note.splitlines()
    assert lines[0].startswith(f"best val_acc {study.winner['best_value']:.4f} {CHANCE}, ")
    assert f"trial {trial_of(study.winner_run)} at epoch {study.winner['best_epoch']}" in lines[0]
    assert f"{study.counts()}; elapsed " in note
    table = [line for line in lines if re.match(r"\| t\d\d \|", line)]
    assert len(table) == len(study.children) and table[0].startswith(f"| {trial_of(study.winner_run)} | ")
    assert f"python search/final.py --study {NAME}" in note


def test_the_plots_are_png_files_on_the_studys_run(study):
    compared(study)
    names = {"learning_curves", "optimization_history", "param_importances", "parallel_coordinate", "slice"}
    listed = {a.path for a in study.client.list_artifacts(study.parent.info.run_id, "plots")}
    assert listed == {f"plots/{name}.png" for name in names}
    folder = study.download("plots")
    for name in names:
        assert (folder / f"{name}.png").read_bytes()[:8] == PNG_SIGNATURE, name


# ---------------------------------------------------------------- the Optuna study


def test_the_optuna_study_has_one_trial_per_run_in_its_own_database(study):
    assert (study.root / "mlflow" / "optuna.db").is_file() and (study.root / "mlflow" / "mlflow.db").is_file()
    optuna_study = optuna.load_study(study_name=NAME, storage=study.optuna_url)
    assert optuna_study.metric_names == ["val_acc"] and optuna_study.direction.name == "MAXIMIZE"
    trials = optuna_study.get_trials()
    assert len(trials) == len(study.children)
    for trial, run in zip(sorted(trials, key=lambda t: t.number), study.children, strict=True):
        assert trial.user_attrs["ray_trial_id"] == run.data.tags["ray_trial_id"]
        assert f"t{trial.number:02d}" == trial_of(run)  # MLflow's label is Optuna's number
        outcome = run.data.tags["trial_status"]
        assert trial.state == OPTUNA_STATES[outcome], trial_of(run)
        if outcome == "completed":
            assert trial.value == run.data.metrics["best_val_acc"]
    assert not [trial for trial in trials if trial.state == TrialState.RUNNING]


def test_the_optuna_study_has_every_epoch_a_trial_reported(study):
    """Ray hands a trial's last result (ASHA's stop, the last epoch) to the searcher's on_trial_complete alone."""
    study_ = optuna.load_study(study_name=NAME, storage=study.optuna_url)
    for trial, run in zip(sorted(study_.get_trials(), key=lambda t: t.number), study.children, strict=True):
        assert sorted(trial.intermediate_values.items()) == study.history(run, "val_acc"), trial_of(run)


# ---------------------------------------------------------------- the console


def test_the_console_shows_the_studys_lines_only(study):
    lines = study.console.splitlines()
    # No warning of any kind either: Ray's and MLflow's are silenced, and the study's own mean something broke.
    noisy = [line for line in lines if "warning" in line.lower() or any(text in line for text in NOT_QUIET)]
    assert not noisy, noisy
    epoch_line = re.compile(r"(t\d\d) epoch +(\d+)/3  train_loss \d+\.\d{4}  val_loss \d+\.\d{4}  val_acc \d\.\d{4}")
    epoch_lines = [line for line in lines if re.match(r"t\d\d epoch ", line)]
    assert epoch_lines and all(epoch_line.fullmatch(line) for line in epoch_lines), epoch_lines
    assert all(line.count("val_acc") == 1 for line in epoch_lines)
    for run in study.children:
        label, outcome = trial_of(run), run.data.tags["trial_status"]
        epochs = study.history(run, "val_acc")
        assert len([line for line in epoch_lines if line.startswith(f"{label} ")]) == len(epochs)
        ending = f"{label} {outcome} after epoch {epochs[-1][0]}, best val_acc {run.data.metrics['best_val_acc']:.4f}"
        ending += " (recipe)" if run.data.tags.get("recipe") == "true" else ""
        assert [line for line in lines if line.startswith(f"{label} ") and " after epoch " in line] == [ending]


def test_the_closing_lines_name_the_winner_its_knobs_and_where_to_look(study):
    lines = study.console.splitlines()
    took = r"(\d+ h )?(\d+ min )?\d+ s"
    assert re.search(rf"^Study {NAME}: {re.escape(study.counts())} in {took}\.$", study.console, re.M)
    best = f"Best trial {trial_of(study.winner_run)}: val_acc = {study.winner['best_value']:.4f} {CHANCE}"
    start = lines.index(f"{best} at epoch {study.winner['best_epoch']}") + 1
    end = next(number for number, line in enumerate(lines) if line.startswith("Recipe:"))
    knobs = [line.split()[0] for line in lines[start:end]]
    assert searched_knobs() <= set(knobs) and "fusion" not in knobs  # vit_depth is a vit's, fusion a hybrid's
    assert f"Optuna:     optuna-dashboard {study.optuna_url}" in study.console


def test_a_shared_best_score_goes_to_the_earliest_trial_and_the_closing_lines_and_note_say_so(study):
    """The earliest of the trials at the best score won, and a tie, where there is one, is said."""
    best = study.winner["best_value"]
    tied = [trial_of(run) for run in study.children if run.data.metrics.get("best_val_acc") == best]
    assert trial_of(study.winner_run) == tied[0]  # the children are in label order
    note = study.parent.data.tags["mlflow.note.content"]
    if len(tied) == 1:
        assert "Tie:" not in study.console + note
        return
    names = f"{', '.join(tied[:-1])} and {tied[-1]} {'both' if len(tied) == 2 else 'all'}"
    line = f"Tie: {names} reached val_acc {best:.4f}; {tied[0]} won: a tie goes to the earliest trial."
    assert line in study.console.splitlines() and line in note.splitlines()


def test_the_study_writes_beside_the_project_and_never_to_mlruns(study):
    assert {path.name for path in study.root.iterdir()} >= {"mlflow", "ray_results", ".cache", "spaces"}
    assert (study.root / "ray_results" / NAME / "best" / "best_model.pt").is_file()
    assert not list(study.root.rglob("mlruns"))


# ---------------------------------------------------------------- --verbose, and a lone trial


@pytest.mark.slow
def test_verbose_shows_rays_own_output(lone_study):
    assert "Configuration for experiment" in lone_study.console
    assert "View detailed results" in lone_study.console


@pytest.mark.slow
def test_a_lone_trial_has_nothing_to_compare_it_with(lone_study):
    (run,) = lone_study.children
    assert run.info.run_name == "t00 completed, best"  # the only trial is the winner
    assert not [key for key in lone_study.parent.data.metrics if key.startswith("importance/")]
    listed = {a.path for a in lone_study.client.list_artifacts(lone_study.parent.info.run_id, "plots")}
    assert listed == {"plots/learning_curves.png", "plots/optimization_history.png"}


# ---------------------------------------------------------------- a study's name is its own


@pytest.mark.parametrize("where", ["mlflow", "optuna"])
def test_a_name_taken_in_the_store_or_in_the_optuna_database_is_refused(study, where):
    """mlflow: the same store, another Ray folder. optuna: a new store and Ray folder, the Optuna database that
    holds the study (Optuna would add the new study's trials to the old one's). Refused before Ray starts."""
    other = study.root / f"other-{where}"
    args = ["--storage-path", str(other)]
    if where == "mlflow":
        named = "in --tracking-uri"
    else:
        args += ["--tracking-uri", f"sqlite:///{other}/mlflow.db", "--optuna-storage", study.optuna_url]
        named = f"in --optuna-storage {study.optuna_url}"
    result, _ = run_in(study.root, *SMOKE_STUDY, "--trials", "1", "--name", NAME, *args)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert f"'{NAME}' exists already {named}" in result.stderr
    assert not (other / NAME).exists()
    assert len(optuna.load_study(study_name=NAME, storage=study.optuna_url).trials) == TRIALS


# ---------------------------------------------------------------- a trial's run while it runs


def test_a_running_trials_run_is_named_by_its_number_then_by_how_it_ended(tmp_path):
    """The callback in this process, with Ray's trials imitated: a run's name while its trial runs."""
    from search.tracking.store import get_or_create_experiment, mlflow_client
    from search.tracking.trials import MlflowTrials

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = mlflow_client(uri)
    experiment_id = get_or_create_experiment(client, MODEL, uri)
    parent = client.create_run(experiment_id, run_name="s", tags={"study": "s"})
    dataset = {"name": "synthetic", "digest": "0", "source_type": "code", "source": "{}", "profile": "{}"}
    callback = MlflowTrials(uri, experiment_id, parent.info.run_id, study_config(name="s", trials=12), dataset)
    error_file = tmp_path / "error.txt"
    error_file.write_text("Traceback (most recent call last):\nRuntimeError: out of memory\n")

    def trial(counter: int):
        return SimpleNamespace(
            trial_id=f"id{counter}", experiment_tag=f"{counter}_lr=0.001", config={"lr": 0.001}, error_file=error_file
        )

    def name(run_trial) -> tuple[str, str]:
        run = client.get_run(callback.run_ids[run_trial.trial_id])
        return run.info.run_name, run.info.status

    done, stopped, crashed = trial(2), trial(4), trial(8)
    for run_trial in (done, stopped, crashed):
        callback.on_trial_start(0, [], run_trial)
    assert [name(run_trial) for run_trial in (done, stopped, crashed)] == [
        ("t01", "RUNNING"),
        ("t03", "RUNNING"),
        ("t07", "RUNNING"),
    ]
    for epoch, score in enumerate((0.5, 0.4, 0.7), 1):
        callback.on_trial_result(0, [], done, {"epoch": epoch, "train_loss": 1.0, "val_acc": score})
    done.last_result = {"epoch": 3, "val_acc": 0.7, "finished": True}
    stopped.last_result = {"epoch": 1, "val_acc": 0.1}
    callback.on_trial_complete(0, [], done)
    callback.on_trial_complete(0, [], stopped)
    callback.on_trial_error(0, [], crashed)
    assert name(done) == ("t01 completed", "FINISHED") and name(stopped) == ("t03 pruned", "FINISHED")
    assert name(crashed) == ("t07 failed", "FAILED")
    crashed_run = client.get_run(callback.run_ids[crashed.trial_id])
    assert crashed_run.data.tags["failure"] == "RuntimeError: out of memory"
    history = client.get_metric_history(callback.run_ids[done.trial_id], "best_val_acc")
    assert [(m.step, m.value) for m in history] == [(1, 0.5), (3, 0.7)]


def test_a_tie_goes_to_the_earliest_trial_in_the_export_the_runs_names_and_the_closing_lines(tmp_path, capsys):
    """Three trials end on one score, Ray listing the latest first: the export, the report's ranking, the
    winner's run name and the closing lines all name the earliest, and say it was a tie."""
    from search.study.console import print_closing
    from search.study.driver import best_checkpoint, trial_labels
    from search.study.report import StudySummary, TrialSummary
    from search.tracking.store import get_or_create_experiment, mlflow_client
    from search.tracking.study_run import name_the_winner
    from search.tracking.trials import MlflowTrials

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = mlflow_client(uri)
    experiment_id = get_or_create_experiment(client, MODEL, uri)
    parent_id = client.create_run(experiment_id, run_name="s", tags={"study": "s"}).info.run_id
    dataset = {"name": "synthetic", "digest": "0", "source_type": "code", "source": "{}", "profile": "{}"}
    config = study_config(name="s", trials=3)
    callback = MlflowTrials(uri, experiment_id, parent_id, config, dataset)
    trials = [
        SimpleNamespace(trial_id=f"ray{9 - n}", experiment_tag=f"{n}_lr=0.001", config={"n": n}) for n in (1, 2, 3)
    ]
    for trial in trials:
        callback.on_trial_start(0, [], trial)
        trial.last_result = {"epoch": 2, "val_acc": 0.4205, "finished": True}
        callback.on_trial_complete(0, [], trial)

    labels = trial_labels(client, parent_id)
    assert labels == {"ray8": "t00", "ray7": "t01", "ray6": "t02"}
    results = [
        SimpleNamespace(
            config=trial.config,
            best_checkpoints=[(f"checkpoint of {trial.trial_id}", {"val_acc": 0.4205, "trial_id": trial.trial_id})],
        )
        for trial in reversed(trials)
    ]
    assert best_checkpoint(results, config, labels=labels) == ("checkpoint of ray8", 0.4205, "ray8")
    assert best_checkpoint(results[:2], config, labels=labels)[2] == "ray7"  # t02 and t01: t01

    def names() -> list[str]:
        runs = client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'")
        return sorted(run.info.run_name for run in runs)

    name_the_winner(client, parent_id, a_winner(trial="t00", trial_id="ray8"))
    assert names() == ["t00 completed, best", "t01 completed", "t02 completed"]
    name_the_winner(client, parent_id, a_winner(trial="t01", trial_id="ray7"))  # an extension's new winner
    assert names() == ["t00 completed", "t01 completed, best", "t02 completed"]

    summary = StudySummary(
        "s",
        "cnn",
        "val_acc",
        "max",
        2,
        1,
        3,
        11,
        3,
        30.0,
        tuple(TrialSummary(labels[t.trial_id], "completed", {}, ((1, 0.3), (2, 0.4205)), t.trial_id) for t in trials),
        winner_id="ray8",
    )
    assert [trial.label for trial in summary.ranked()] == ["t00", "t01", "t02"]
    best = a_winner(
        trial="t00",
        trial_id="ray8",
        metric="val_acc",
        best_value=0.4205,
        best_epoch=2,
        hyperparameters=Hyperparameters(lr=0.001),
    )
    print_closing(config, best, str(tmp_path / "best"), experiment_id, summary)
    lines = capsys.readouterr().out.splitlines()
    start = lines.index("Best trial t00: val_acc = 0.4205 (chance 0.0909) at epoch 2")
    assert (
        lines[start + 1]
        == "Tie: t00, t01 and t02 all reached val_acc 0.4205; t00 won: a tie goes to the earliest trial."
    )
