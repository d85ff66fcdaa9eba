"""The comparison, step by step: studies, retrains, the reference, measurements, statistics, report.

Each step leaves its result in MLflow before the next starts, and `plan` finds it there
again, so an interrupted comparison continues where it stopped. The studies run as
run.py processes (each its own Ray); the retrains, the reference and the measurements
run here, one after the other, so they have the device to themselves.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import hashlib
import json
import math
import signal
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from mlflow.entities import Metric
from sklearn.metrics import confusion_matrix

from search.cli import interrupts_ignored, weights_files
from search.comparison.costs import measure_costs, measure_ensemble_costs
from search.comparison.plan import (
    COMPARISON_ROLE,
    COMPARISON_TAG,
    ENSEMBLE_SETTING_TAG,
    REFERENCE_MODEL_TAG,
    REFERENCE_ROLE,
    Entry,
    Plan,
    ensemble_setting,
    finished_ensemble,
    finished_reference,
    finished_retrain,
    refuse_different_test_splits,
)
from search.comparison.plots import write_plots
from search.comparison.report import PLOT_FILES, markdown, table_lines
from search.comparison.results import Comparison, Costs, Ensemble, ModelResult, SearchCost, ensemble_label
from search.comparison.stats import recommend
from search.errors import UsageError
from search.evaluation.intervals import metric_intervals, stratified_resamples
from search.evaluation.paired import PairedTest, paired_test
from search.evaluation.predictions import PREDICTIONS_FILE, Predictions, read_predictions
from search.final_model.ensemble import study_members
from search.final_model.retrain import METRICS_FILE, execute_final, prepare_final, prepare_members
from search.final_model.sources import load_study, winner_from_mlflow
from search.records.retrain import RetrainRequest
from search.records.study_config import StudyConfig
from search.records.winner import Winner
from search.tracking.schema import (
    COMPUTE_VS_RECIPE,
    ELAPSED_METRIC,
    PARENT_TAG,
    ROLE_TAG,
    STUDY_TAG,
    mlflow_lines,
    run_page,
    store_exists,
)
from search.tracking.store import all_runs, get_or_create_experiment, log_params, mlflow_client, quoted, read_artifact
from search.tracking.study_run import find_study, read_split_record
from trainables.config import Hyperparameters, SpeedOptions, knobs_of
from trainables.fidelity import COMPUTE_EPOCHS
from trainables.spec import REFERENCE, ModelSpec

RUN_SCRIPT = Path(__file__).resolve().parents[1] / "run.py"
REPORT_TEXT, REPORT_MARKDOWN, REPORT_DATA = "report.txt", "report.md", "comparison.json"
INPUTS_TAG = "inputs"
"""A digest of the final runs a comparison run was made from: the same inputs, the same report."""
DEFAULT_EXPERIMENT = "comparisons"
PR_SET_PDEATHSIG = 1
"""prctl's option: the signal a process gets when its parent dies (linux/prctl.h)."""


class StepFailed(Exception):
    """A study or retrain ended without a result; its exit code is the comparison's."""

    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


# ---------------------------------------------------------------- the steps


def run_comparison(args: argparse.Namespace, plan: Plan, run_argv: list[str]) -> int:
    """Every step that is not done yet, then the report; the exit code of the first step that failed."""
    print(f"Comparison {plan.name}: {', '.join(f'{e.label} ({e.study}, {e.state})' for e in plan.entries)}", flush=True)
    try:
        try:
            for entry in plan.entries:
                if entry.state != "finished":
                    run_study(entry, run_argv)
        finally:  # what --ensemble the studies ran with, so that a continuation with another is refused
            if not args.studies:
                record_ensemble_setting(plan, args.ensemble)
        client = mlflow_client(plan.tracking_uri, create=False)
        # Studies run at different times: the data may have changed between them, and then their test splits differ
        refuse_different_test_splits(client, [find_study(plan.tracking_uri, entry.study) for entry in plan.entries])
        finals = {entry.label: retrained(client, entry, args) for entry in plan.entries}
        winners = {entry.label: load_study(plan.tracking_uri, entry.study, None) for entry in plan.entries}
        if args.ensemble:
            entry = ensemble_study(plan.entries, winners)
            finals[ensemble_label(entry.label, args.ensemble)] = ensemble_retrained(client, entry, args)
        if args.reference:
            finals[args.reference] = reference_run(client, plan, winners[plan.entries[0].label], args)
        return report(client, plan, finals, winners, args)
    except StepFailed as failed:
        return failed.code
    except KeyboardInterrupt:
        print(
            f"\ncomparison {plan.name} interrupted; finished studies and retrains are kept: run the same command again"
        )
        return 130


def run_study(entry: Entry, run_argv: list[str]) -> None:
    """run.py in a process of its own (its own Ray); Ctrl-C here is handed on to it, once."""
    resume = ["--resume"] if entry.state == "unfinished" else []
    command = [sys.executable, str(RUN_SCRIPT), "--model", entry.config.model, "--name", entry.study]
    command += resume + run_argv
    print(f"\n== {entry.label}: {'resuming' if resume else 'starting'} study {entry.study}", flush=True)
    # A session of its own: a terminal's Ctrl-C reaches this process only, which passes one SIGINT on
    # (run.py's graceful stop); two would hurry Ray's shutdown.
    process = subprocess.Popen(command, start_new_session=True, preexec_fn=interrupted_with_parent)
    try:
        code = process.wait()
    except KeyboardInterrupt:
        process.send_signal(signal.SIGINT)
        process.wait()
        raise
    if code == 130:
        raise KeyboardInterrupt
    if code != 0 or (parent := find_study(entry.config.tracking_uri, entry.study)) is None:
        raise StepFailed(code or 1)
    if parent.info.status != "FINISHED":  # run.py stopped it (a lost cluster, a failed store): its message said why
        raise StepFailed(1)


def interrupted_with_parent() -> None:
    """In the study's process, before run.py starts (Linux): if this process dies, even by kill -9, the study
    gets SIGINT and stops as after Ctrl-C, resumable, rather than running on unseen beside the rerun that
    would resume it."""
    with contextlib.suppress(OSError, AttributeError):  # not Linux: the study then runs to its end on its own
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGINT)


def retrained(client, entry: Entry, args: argparse.Namespace) -> str:
    """The final run of the study's winner: one that exists, or one made now as final.py --study makes it."""
    run_id = finished_retrain(client, entry.study, PREDICTIONS_FILE)
    if run_id is not None and tested_on_study_split(client, run_id, entry.study, args.tracking_uri):
        print(f"== {entry.label}: reusing retrain {run_id} of study {entry.study}", flush=True)
        return run_id
    print(f"\n== {entry.label}: retraining the winner of study {entry.study}", flush=True)
    request = retrain_request(args, entry.label)
    code = execute_final(prepare_final(request, winner_from_mlflow(args.tracking_uri, study=entry.study)))
    if code == 130:
        raise KeyboardInterrupt
    run_id = finished_retrain(client, entry.study, PREDICTIONS_FILE)
    if code != 0 or run_id is None:
        raise StepFailed(code or 1)
    return run_id


def record_ensemble_setting(plan: Plan, ensemble: int | None) -> None:
    """ENSEMBLE_SETTING_TAG on each of the comparison's studies that has a run and not the tag yet."""
    if not store_exists(plan.tracking_uri):  # the first study stopped before it wrote anything
        return
    client = mlflow_client(plan.tracking_uri, create=False)
    for entry in plan.entries:
        parent = find_study(plan.tracking_uri, entry.study)
        if parent is not None and ENSEMBLE_SETTING_TAG not in parent.data.tags:
            client.set_tag(parent.info.run_id, ENSEMBLE_SETTING_TAG, ensemble_setting(ensemble))


def ensemble_study(entries: list[Entry], winners: dict[str, Winner]) -> Entry:
    """The study whose ensemble is built: the one whose winner scored best on validation, the search's own
    measure. Not the test: the ensemble is then judged on the test images, and a choice made on them would favour
    it. A tie goes to the first study."""

    def score(entry: Entry) -> float:
        value = winners[entry.label].best_value
        if value is None or value != value:
            return -math.inf
        return value if entry.config.mode == "max" else -value

    return max(entries, key=score)


def ensemble_retrained(client, entry: Entry, args: argparse.Namespace) -> str:
    """The final run of the study's K best configurations as an ensemble: one that exists, or one made now as
    final.py --study S --ensemble K makes it."""
    k = args.ensemble
    label = ensemble_label(entry.label, k)
    run_id = finished_ensemble(client, entry.study, k, PREDICTIONS_FILE)
    if run_id is not None and tested_on_study_split(client, run_id, entry.study, args.tracking_uri):
        print(f"== {label}: reusing ensemble retrain {run_id} of study {entry.study}", flush=True)
        return run_id
    print(f"\n== {label}: retraining the {k} best configurations of study {entry.study} as an ensemble", flush=True)
    code = execute_final(
        prepare_members(retrain_request(args, label), study_members(args.tracking_uri, entry.study, k))
    )
    if code == 130:
        raise KeyboardInterrupt
    run_id = finished_ensemble(client, entry.study, k, PREDICTIONS_FILE)
    if code != 0 or run_id is None:
        raise StepFailed(code or 1)
    return run_id


def retrain_request(args: argparse.Namespace, folder: str, **settings: Any) -> RetrainRequest:
    """A retrain as compare.py asks for one: the comparison's store, cache and weights, results in `folder` under
    --out; `settings` as RetrainRequest's."""
    return RetrainRequest(
        tracking_uri=args.tracking_uri,
        cache_dir=args.cache_dir,
        weights=weights_files(args.weights),
        no_pretrained=args.no_pretrained,
        out=str(Path(args.out) / folder),
        **settings,
    )


def reference_run(client, plan: Plan, winner: Winner, args: argparse.Namespace) -> str:
    """The larger model, trained once with the recipe's defaults on the studies' split and budget."""
    name = args.reference
    run_id = finished_reference(client, plan.name, name, PREDICTIONS_FILE)
    if run_id is not None and tested_on_study_split(client, run_id, plan.entries[0].study, plan.tracking_uri):
        print(f"== reference {name}: reusing run {run_id}", flush=True)
        return run_id
    config = reference_config(winner, name)
    print(f"\n== reference {name}: training once with default hyperparameters, early-stopped on val", flush=True)
    request = retrain_request(
        args,
        f"reference-{name}",
        keep_val=True,  # the recipe: up to the study's epoch budget, stopped early on the validation split
        experiment=args.experiment or DEFAULT_EXPERIMENT,
    )
    prepared = prepare_final(request, config, split_of=winner)  # the first study's test images, as the others'
    prepared = replace(prepared, tags={ROLE_TAG: REFERENCE_ROLE, COMPARISON_TAG: plan.name, REFERENCE_MODEL_TAG: name})
    code = execute_final(prepared)
    if code == 130:
        raise KeyboardInterrupt
    run_id = finished_reference(client, plan.name, name, PREDICTIONS_FILE)
    if code != 0 or run_id is None:
        raise StepFailed(code or 1)
    return run_id


def tested_on_study_split(client, run_id: str, study: str, tracking_uri: str) -> bool:
    """Whether a finished final run tested on images of the study's recorded test split alone (one that would not
    decode may be missing): a retrain made before the split was taken from the record may have cut the data again,
    after it had changed, and tested on images the search trained on. Such a run is not reused (a note says so)."""
    parent = find_study(tracking_uri, study)
    record = read_split_record(client, parent) if parent is not None else None
    if record is None:  # an older study: nothing to check against
        return True
    outside = set(read_final_predictions(client, study, run_id).keys) - set(record.images["test"])
    if outside:
        print(
            f"note: final run {run_id} tested on {len(outside)} image(s) outside study {study}'s test split "
            f"(the data changed before it ran): not reused, retraining on the study's split",
            flush=True,
        )
    return not outside


def reference_config(winner: Winner, backbone: str) -> Winner:
    """A winner's classes, split, image size, metric and epoch budget, with a reference model and default
    hyperparameters: of no study and no trial (its config.yaml repeats the reference run, with final.py --config)."""
    return replace(
        winner,
        model=REFERENCE,
        backbone=backbone,
        hyperparameters=Hyperparameters(),
        best_value=None,
        best_epoch=None,
        study=None,
        trial=None,
        trial_id=None,
        model_spec=None,
        source=f"reference model {backbone}",
        experiment_id=None,
        run_id=None,
    )


# ---------------------------------------------------------------- the report


def report(client, plan: Plan, finals: dict[str, str], winners: dict[str, Winner], args: argparse.Namespace) -> int:
    out = Path(args.out)
    inputs = inputs_digest(finals, args.resamples)
    saved = saved_comparison(client, plan.name, inputs)
    if saved is not None:
        text = read_artifact(client, saved, REPORT_TEXT) or ""
        print(f"\nComparison {plan.name} is complete; its report (run {saved}):\n\n{text}")
        return 0
    predictions = {label: read_final_predictions(client, label, run_id) for label, run_id in finals.items()}
    check_same_images(predictions)
    print(f"\n== measuring costs and bootstrapping {args.resamples} resamples of the test images", flush=True)
    first = next(iter(predictions.values()))
    resamples = stratified_resamples(first.labels, args.resamples, plan.entries[0].config.seed)
    entries = {entry.label: entry for entry in plan.entries}
    parents = {entry.label: find_study(plan.tracking_uri, entry.study) for entry in plan.entries}  # read once
    ensembles = {  # the ensemble's label -> the study its members come from (compare.py builds one at most)
        label: entry
        for entry in plan.entries
        if args.ensemble and (label := ensemble_label(entry.label, args.ensemble)) in finals
    }
    models = []
    for label, run_id in finals.items():
        if label in ensembles:
            of = ensembles[label]
            models.append(
                ensemble_result(
                    client, label, run_id, of, parents[of.label], predictions[label], resamples, args.tracking_uri
                )
            )
            continue
        entry = entries.get(label)
        winner = winners[label] if entry else reference_config(winners[plan.entries[0].label], label)
        models.append(
            model_result(
                client,
                label,
                run_id,
                entry,
                parents.get(label),
                winner,
                predictions[label],
                resamples,
                plan.entries[0].config,
            )
        )
    models = [with_retrain_compute(client, model, finals, ensembles) for model in models]
    pairs = paired_tests(predictions, [m.name for m in models if not m.reference], resamples)
    comparison = Comparison(
        name=plan.name,
        classes=first.classes,
        test_images=len(first.keys),
        models=models,
        pairs=pairs,
        recommendation=recommend(models, pairs),
        resamples=args.resamples,
        settings=shared_settings(plan, args.reference, args.ensemble),
    )
    lines = table_lines(comparison)
    write_report(comparison, lines, out)
    with interrupts_ignored():  # one whole comparison run, or none
        run_id, experiment_id = log_comparison(client, plan, comparison, finals, parents, inputs, out, args)
    print()
    print("\n".join(lines))
    print(f"\nReport:     {out}/{REPORT_MARKDOWN} (plots: {', '.join(PLOT_FILES)})")
    print("\n".join(mlflow_lines(plan.tracking_uri, run_page(plan.tracking_uri, experiment_id, run_id))))
    return 0


def inputs_digest(finals: dict[str, str], resamples: int) -> str:
    return hashlib.sha256(json.dumps([sorted(finals.items()), resamples]).encode()).hexdigest()[:16]


def saved_comparison(client, name: str, inputs: str) -> str | None:
    """A finished comparison run made from these very final runs: its report stands."""
    runs = all_runs(
        client,
        f"tags.{ROLE_TAG} = '{COMPARISON_ROLE}' and tags.{COMPARISON_TAG} = {quoted(name)} "
        f"and tags.{INPUTS_TAG} = '{inputs}' and attributes.status = 'FINISHED'",
    )
    return runs[0].info.run_id if runs else None


def read_final_predictions(client, label: str, run_id: str) -> Predictions:
    text = read_artifact(client, run_id, PREDICTIONS_FILE)
    if text is None:
        raise UsageError(f"the final run {run_id} of {label} has no {PREDICTIONS_FILE}: retrain it")
    try:
        return read_predictions(text, f"{PREDICTIONS_FILE} of run {run_id}")
    except ValueError as error:
        raise UsageError(str(error)) from None


def check_same_images(predictions: dict[str, Predictions]) -> None:
    """Paired tests need the same images, in the same order, with the same labels and classes."""
    (first_label, first), *others = predictions.items()
    for label, other in others:
        if other.keys != first.keys or other.classes != first.classes or not np.array_equal(other.labels, first.labels):
            raise UsageError(
                f"{label} and {first_label} were tested on different images or classes (was the data changed "
                f"between their retrains?): retrain them on the same data"
            )


def model_result(
    client,
    label: str,
    run_id: str,
    entry: Entry | None,
    parent,
    winner: Winner,
    predictions: Predictions,
    resamples: np.ndarray,
    study: StudyConfig,
) -> ModelResult:
    """A model's scores with intervals, its measured costs and (for a searched model) the search's cost."""
    config = entry.config if entry else study
    return ModelResult(
        name=label,
        metrics=metric_intervals(predictions, resamples),
        costs=costs_of(winner, config),
        confusion=confusion_matrix(predictions.labels, predictions.predicted, labels=range(len(predictions.classes))),
        final_run_id=run_id,
        study=entry.study if entry else None,
        search=search_cost(client, entry, parent) if entry else None,
        config=knobs_of(winner.model, winner.hyperparameters.to_dict()) if entry else {},
        reference=entry is None,
    )


def ensemble_result(
    client,
    label: str,
    run_id: str,
    of: Entry,
    parent,
    predictions: Predictions,
    resamples: np.ndarray,
    tracking_uri: str,
) -> ModelResult:
    """The ensemble's scores with intervals (from its predictions, as any model's), its costs measured member by
    member and through the scoring network it ships as, its study's search, and its members' retrain compute."""
    record = ensemble_record(client, label, run_id)
    members = [member["label"] for member in record["members"]]
    configs = [winner_from_mlflow(tracking_uri, study=of.study, trial=member) for member in members]
    epochs = epochs_run(client, run_id, members)
    return ModelResult(
        name=label,
        metrics=metric_intervals(predictions, resamples),
        costs=ensemble_costs(configs, of.config),
        confusion=confusion_matrix(predictions.labels, predictions.predicted, labels=range(len(predictions.classes))),
        final_run_id=run_id,
        study=of.study,
        search=search_cost(client, of, parent),
        retrain_vs_recipe=epochs / of.config.epochs,
        ensemble=Ensemble(of.label, tuple(members), int(record["forward_passes"])),
    )


def ensemble_record(client, label: str, run_id: str) -> dict:
    """metrics.json's "ensemble" of an ensemble's final run: its members (labels, best first) and forward passes."""
    text = read_artifact(client, run_id, METRICS_FILE)
    record = json.loads(text).get("ensemble") if text else None
    if not record:
        raise UsageError(f"the final run {run_id} of {label} records no ensemble in its {METRICS_FILE}: retrain it")
    return record


def ensemble_costs(members: list[Winner], study: StudyConfig) -> Costs:
    """An ensemble's costs on the study's device, as costs_of measures a single model's."""
    specs = [
        (
            ModelSpec(
                member.model, len(member.classes), member.img_size, pretrained=False, backbone=member.backbone
            ).with_knobs(member.hyperparameters),
            member.hyperparameters,
        )
        for member in members
    ]
    cuda = bool(study.gpus_per_trial) and torch.cuda.is_available()
    return measure_ensemble_costs(specs, torch.device("cuda" if cuda else "cpu"), SpeedOptions.of(study))


def with_retrain_compute(
    client, model: ModelResult, finals: dict[str, str], ensembles: dict[str, Entry]
) -> ModelResult:
    """The single model an ensemble is set beside, with its retrain's compute in recipe trainings (the epochs its
    final run trained over the study's --epochs), so the two compare; every other model as it is."""
    beside = {entry.label: entry for entry in ensembles.values()}
    entry = beside.get(model.name)
    if entry is None:
        return model
    return replace(model, retrain_vs_recipe=epochs_run(client, finals[model.name]) / entry.config.epochs)


def epochs_run(client, run_id: str, members: list[str] | None = None) -> int:
    """The epochs a final run trained, every network's, early-stopped ones as far as they ran: one point per epoch
    in the history of its train_loss, and of an ensemble's other members' member_<label>_train_loss (final.py
    logs them so)."""
    keys = ["train_loss", *(f"member_{label}_train_loss" for label in (members or [])[1:])]
    return sum(len(client.get_metric_history(run_id, key)) for key in keys)


def costs_of(winner: Winner, study: StudyConfig) -> Costs:
    """Measured on the study's device (CUDA if its trials had a GPU share), with its speed options."""
    spec = ModelSpec(
        winner.model, len(winner.classes), winner.img_size, pretrained=False, backbone=winner.backbone
    ).with_knobs(winner.hyperparameters)
    cuda = bool(study.gpus_per_trial) and torch.cuda.is_available()
    speed = SpeedOptions.of(study)
    return measure_costs(spec, winner.hyperparameters, torch.device("cuda" if cuda else "cpu"), speed)


def search_cost(client, entry: Entry, parent) -> SearchCost:
    """The study's wall time (summed over its sessions) and GPU-hours: each trial's time times its GPU share;
    `parent`: the study's run."""
    trials = client.search_runs(
        [parent.info.experiment_id], f"tags.`{PARENT_TAG}` = '{parent.info.run_id}'", max_results=50_000
    )
    trial_seconds = sum((run.info.end_time - run.info.start_time) / 1000 for run in trials if run.info.end_time)
    return SearchCost(
        wall_seconds=parent.data.metrics.get(ELAPSED_METRIC, float("nan")),
        gpu_hours=trial_seconds / 3600 * (entry.config.gpus_per_trial or 0.0),
        trials=len(trials),
        compute_epochs=parent.data.metrics.get(COMPUTE_EPOCHS, float("nan")),
        compute_vs_recipe=parent.data.metrics.get(COMPUTE_VS_RECIPE, float("nan")),
    )


def paired_tests(predictions: dict[str, Predictions], searched: list[str], resamples: np.ndarray) -> list[PairedTest]:
    """Every pair of searched models, then the reference against each."""
    pairs = [
        paired_test(a, predictions[a], b, predictions[b], resamples)
        for i, a in enumerate(searched)
        for b in searched[i + 1 :]
    ]
    references = [label for label in predictions if label not in searched]
    pairs += [paired_test(r, predictions[r], s, predictions[s], resamples) for r in references for s in searched]
    return pairs


def shared_settings(plan: Plan, reference: str | None, ensemble: int | None = None) -> dict:
    config = plan.entries[0].config
    settings = {
        "data": config.data,
        "seed": config.seed,
        "img_size": config.img_size,
        "epochs": config.epochs,
        "trials": config.trials,
        "smoke": config.smoke,
        "pretrained": config.pretrained,
        "studies": ", ".join(entry.study for entry in plan.entries),
    }
    if reference:
        settings["reference"] = reference
    if ensemble:
        settings["ensemble"] = ensemble
    for key in ("img_size", "epochs", "trials", "pretrained"):
        values = [getattr(entry.config, key) for entry in plan.entries]
        if len(set(values)) > 1:  # --studies run with other budgets: say so rather than pretend
            settings[key] = ", ".join(
                f"{entry.label} {value}" for entry, value in zip(plan.entries, values, strict=True)
            )
    return settings


def write_report(comparison: Comparison, lines: list[str], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / REPORT_TEXT).write_text("\n".join(lines) + "\n")
    (out / REPORT_MARKDOWN).write_text(markdown(comparison))
    (out / REPORT_DATA).write_text(json.dumps(as_record(comparison), indent=1))
    write_plots(comparison, out)


def as_record(comparison: Comparison) -> dict:
    """comparison.json: every number of the report, for a notebook."""
    record = asdict(comparison)
    with_ensemble = any(model.ensemble is not None for model in comparison.models)
    for model in record["models"]:
        model["confusion"] = np.asarray(model["confusion"]).tolist()
        if not with_ensemble:  # a comparison without --ensemble: its file as it was before
            del model["retrain_vs_recipe"], model["ensemble"]
    return record


def log_comparison(
    client,
    plan: Plan,
    comparison: Comparison,
    finals: dict[str, str],
    parents: dict,
    inputs: str,
    out: Path,
    args: argparse.Namespace,
) -> tuple[str, str]:
    """One run, role=comparison: the report as its description, its numbers as metrics, its files as artifacts."""
    experiment_id = get_or_create_experiment(client, args.experiment or DEFAULT_EXPERIMENT, plan.tracking_uri)
    tags = {
        ROLE_TAG: COMPARISON_ROLE,
        COMPARISON_TAG: plan.name,
        INPUTS_TAG: inputs,
        "mlflow.note.content": markdown(comparison, plots=False) + runs_section(client, finals, parents),
        **{f"study.{entry.label}": entry.study for entry in plan.entries},
        **{f"final_run.{label}": run_id for label, run_id in finals.items()},
    }
    run = client.create_run(experiment_id, run_name=plan.name, tags=tags)
    run_id = run.info.run_id
    try:
        study_run = parents[plan.entries[0].label]
        if study_run is not None:  # the studies' data, in the runs table's Dataset column
            client.log_inputs(run_id, datasets=study_run.inputs.dataset_inputs)
        log_params(client, run_id, comparison.settings | {"resamples": comparison.resamples})
        client.log_batch(run_id, metrics=comparison_metrics(comparison))
        for name in (REPORT_TEXT, REPORT_MARKDOWN, REPORT_DATA, *PLOT_FILES):
            client.log_artifact(run_id, str(out / name))
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return run_id, experiment_id


def runs_section(client, finals: dict[str, str], parents: dict) -> str:
    """Links, for the run's description, to each study's run and each final run (UI-relative: any host)."""

    def link(text: str, run_id: str) -> str:
        return f"[{text}](#/experiments/{client.get_run(run_id).info.experiment_id}/runs/{run_id})"

    lines = ["", "## Runs", ""]
    for label, final_run in finals.items():
        study = parents.get(label)
        found = f"{link(f'study {study.data.tags[STUDY_TAG]}', study.info.run_id)}, " if study is not None else ""
        lines.append(f"- **{label}**: {found}{link('final run', final_run)}")
    return "\n".join(lines) + "\n"


def comparison_metrics(comparison: Comparison) -> list[Metric]:
    """<model>/<metric> with _low and _high bounds, and the costs, so the runs table can sort and chart them."""
    stamp = int(time.time() * 1000)
    values: dict[str, float] = {}
    for model in comparison.models:
        for key, interval in model.metrics.items():
            values |= {f"{model.name}/{key}": interval.value, f"{model.name}/{key}_low": interval.low}
            values[f"{model.name}/{key}_high"] = interval.high
        values[f"{model.name}/parameters"] = model.costs.parameters
        values[f"{model.name}/train_images_per_s"] = model.costs.train_images_per_s
        values |= {f"{model.name}/latency_ms_batch{b}": ms for b, ms in model.costs.latency_ms.items()}
        if model.ensemble is not None:
            values[f"{model.name}/forward_passes"] = model.ensemble.forward_passes
            values[f"{model.name}/retrain_vs_recipe"] = model.retrain_vs_recipe
        if model.search is not None:
            values[f"{model.name}/search_gpu_hours"] = model.search.gpu_hours
            values[f"{model.name}/search_compute_epochs"] = model.search.compute_epochs
            values[f"{model.name}/search_compute_vs_recipe"] = model.search.compute_vs_recipe
    return [Metric(key, float(value), stamp, 0) for key, value in values.items() if value == value]
