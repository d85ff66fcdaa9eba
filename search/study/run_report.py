"""The study's run explains itself: its note, its plots and its parameter importances.

Made when a study ends, and again when a resumed study ends: the trials are read back
from their MLflow child runs (every session's), the Optuna study from its database, so
the report covers the whole study, not one session of it.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import optuna
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from search.records.study_config import StudyConfig
from search.records.trial_status import TrialStatus
from search.records.winner import Winner
from search.study.confirm import retrained_trial
from search.study.gain import baseline_metrics
from search.study.pareto import (
    FRONT_PLOT,
    FRONT_TABLE,
    Point,
    Tradeoff,
    metric_only,
    write_front_plot,
    write_front_table,
)
from search.study.report import StudySummary, TrialSummary, describe, importances, write_plots
from search.tracking.runs_view import runs_view, save_runs_view
from search.tracking.schema import (
    CONFIRM_ROLE,
    ELAPSED_METRIC,
    PARENT_TAG,
    RECIPE_TAG,
    ROLE_TAG,
    STATUS_TAG,
    TRIAL_ID_TAG,
    TRIAL_LABEL_TAG,
)
from trainables.config import knobs_of
from trainables.data import DatasetIndex
from trainables.fidelity import COMPUTE_EPOCHS

NOTE_TAG = "mlflow.note.content"
"""The run's description, shown (as Markdown) at the top of its page in the MLflow UI."""
PLOTS_DIR = "plots"
SUPERSEDED = TrialStatus.LOST
"""Runs of trials a killed study lost before Ray's snapshot: Ray drew each again, under the same number."""


def study_summary(
    client: MlflowClient,
    config: StudyConfig,
    parent_id: str,
    index: DatasetIndex,
    study: optuna.Study | None,
    winner: Winner | None,
) -> StudySummary:
    """The study as its MLflow runs record it: settings, elapsed time, every trial's outcome and curve, and
    its knobs as Optuna sampled them (typed; MLflow keeps params as text); `winner`: export_best's record;
    `index`: the study's data, as its trials used it (its classes, its images per split)."""
    parent = client.get_run(parent_id)
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}'", max_results=50_000
    )
    sampled = {t.user_attrs.get(TRIAL_ID_TAG): t.params for t in study.get_trials(deepcopy=False)} if study else {}
    runs = sorted(
        (
            (trial_summary(client, run, config.metric, sampled.get(run.data.tags.get(TRIAL_ID_TAG))), run)
            for run in children
            if run.data.tags.get(STATUS_TAG) != SUPERSEDED
        ),
        key=lambda pair: pair[0].label,
    )
    trials = [trial for trial, run in runs if run.data.tags.get(ROLE_TAG) != CONFIRM_ROLE]
    retrains = tuple(trial for trial, run in runs if run.data.tags.get(ROLE_TAG) == CONFIRM_ROLE)
    return StudySummary(
        name=config.name,
        model=config.model,
        metric=config.metric,
        mode=config.mode,
        max_t=config.epochs,
        grace_period=config.asha_grace_period,
        reduction_factor=config.reduction_factor,
        num_classes=len(index.classes),
        planned_trials=config.trials,
        elapsed_s=parent.data.metrics.get(ELAPSED_METRIC, 0.0),
        trials=tuple(trials),
        winner_id=search_trial_of(winner.trial_id or "", trials, retrains) if winner else "",
        retrains=retrains,
        tradeoff=tradeoff(config, study, trials),
        train_images=len(index.splits["train"]),
        val_images=len(index.splits["val"]),
        pretrained=config.pretrained,
        # Every run's, a lost one's too: Ray drew it again, but its epochs were trained.
        compute_epochs=sum(run.data.metrics.get(COMPUTE_EPOCHS, 0.0) for run in children),
    )


def tradeoff(config: StudyConfig, study: optuna.Study | None, trials: list[TrialSummary]) -> Tradeoff | None:
    """A multi-objective study's completed trials as the search saw them: the values the Optuna study was told
    (best metric, cost), named by their MLflow runs. None for a single-objective study, or one without Optuna."""
    if config.cost is None or study is None:
        return None
    runs = {trial.trial_id: trial for trial in trials}
    points = []
    for told in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        run = runs.get(told.user_attrs.get(TRIAL_ID_TAG, ""))
        if run is not None and told.values is not None and len(told.values) == 2:
            points.append(Point(run.label, told.values[0], told.values[1], run.run_id, dict(told.params)))
    return Tradeoff(config.metric, config.mode, config.cost, tuple(sorted(points, key=lambda point: point.label)))


def search_trial_of(trial_id: str, trials: list[TrialSummary], retrains: tuple[TrialSummary, ...]) -> str:
    """The search trial whose configuration a confirmation's retrain trained ("t07 seed 1" -> t07's id); any
    other trial's id as it is."""
    retrain = next((trial for trial in retrains if trial.trial_id == trial_id), None)
    if retrain is None:
        return trial_id
    origin = retrained_trial(retrain.label)
    return next((trial.trial_id for trial in trials if trial.label == origin), trial_id)


def trial_summary(client: MlflowClient, run, metric: str, params: dict | None) -> TrialSummary:
    tags = run.data.tags
    history = sorted(client.get_metric_history(run.info.run_id, metric), key=lambda m: m.step)
    return TrialSummary(
        label=tags.get(TRIAL_LABEL_TAG, run.info.run_name),
        outcome=tags.get(STATUS_TAG, TrialStatus.RUNNING.value),
        params=params if params is not None else dict(run.data.params),
        curve=tuple(dict((m.step, m.value) for m in history).items()),
        trial_id=tags.get(TRIAL_ID_TAG, ""),
        run_id=run.info.run_id,
        recipe=tags.get(RECIPE_TAG) == "true",
    )


def log_study_report(
    client: MlflowClient,
    config: StudyConfig,
    parent_id: str,
    index: DatasetIndex,
    knobs: list[str],
    winner: Winner | None,
    study: optuna.Study | None,
) -> StudySummary:
    """Note, plots, importance/<knob> metrics and the recipe's and the compute's (search.study.gain) on the
    study's run, and their charts in the study's view of the runs page (`knobs`: the searched ones; `study`: the
    Optuna study, None where it has no database); the summary they came from."""
    summary = study_summary(client, config, parent_id, index, study, winner)
    winning = knobs_of(config.model, winner.hyperparameters.to_dict()) if winner else {}
    client.set_tag(parent_id, NOTE_TAG, describe(summary, winner, winning))
    # Optuna's plots and importances take one value per trial: a multi-objective study's are of its metric.
    searched = metric_only(study) if study is not None else None
    with tempfile.TemporaryDirectory() as folder:
        for plot in write_plots(searched, summary, Path(folder)):
            client.log_artifact(parent_id, str(plot), PLOTS_DIR)
        if summary.tradeoff is not None and summary.tradeoff.points:
            for front_file in write_front(summary, Path(folder)):
                client.log_artifact(parent_id, str(front_file))
    scores = importances(searched)
    stamp = int(time.time() * 1000)  # a resumed study's newer numbers must win MLflow's "latest"
    logged = {**{f"importance/{name}": value for name, value in scores.items()}, **baseline_metrics(summary)}
    client.log_batch(parent_id, metrics=[Metric(key, value, stamp, 0) for key, value in logged.items()])
    experiment_id = client.get_run(parent_id).info.experiment_id
    save_runs_view(client, experiment_id, config, runs_view(config, knobs, tuple(scores)))
    return summary


def write_front(summary: StudySummary, folder: Path) -> list[Path]:
    """pareto_front.png and pareto_front.csv of a multi-objective study, in `folder`."""
    assert summary.tradeoff is not None
    title = f"{summary.name} ({summary.model}): {summary.metric} against {summary.tradeoff.cost.metric}"
    return [
        write_front_plot(summary.tradeoff, title, folder / FRONT_PLOT),
        write_front_table(summary.tradeoff, summary.name, folder / FRONT_TABLE),
    ]
