"""compare.py --ensemble K: the ensemble set beside the single models in the report, its cost, which study's it is,
and the refusals (a bad K, a continuation with another K), all without a study.

The report's Comparison is built by hand, as test_compare_report.py builds its own: cnn and vit searched, and an
ensemble of 3 of vit's configurations beside them.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
from helpers import ROOT
from helpers.cli import call_main, one_line_refusal

from search.comparison.driver import as_record, comparison_metrics, ensemble_study, shared_settings
from search.comparison.plan import Entry, Plan, check_ensemble, ensemble_setting, refuse_changed_ensemble
from search.comparison.report import markdown, table_lines
from search.comparison.results import Comparison, Costs, Ensemble, ModelResult, SearchCost, ensemble_label
from search.comparison.stats import recommend
from search.errors import UsageError
from search.evaluation.intervals import Interval
from search.evaluation.paired import PairedTest
from search.records.study_config import StudyConfig

CLASSES = ["a", "b", "c"]
ENSEMBLE = ensemble_label("vit", 3)


def scores(accuracy: float) -> dict[str, Interval]:
    return {
        "test_acc": Interval(accuracy, accuracy - 0.03, accuracy + 0.03),
        "test_ece": Interval(0.05, 0.03, 0.07),
    }


def model(name: str, accuracy: float, latency_1: float, parameters: int, **fields) -> ModelResult:
    return ModelResult(
        name=name,
        metrics=scores(accuracy),
        costs=Costs(parameters, "cpu", 100.0, {1: latency_1, 32: 10 * latency_1}),
        confusion=np.eye(3, dtype=int),
        final_run_id=f"run-{name}",
        study=f"cmp-{name.split('-')[0]}",
        search=SearchCost(600.0, 0.0, 10, 41.0, 10.25),
        **fields,
    )


@pytest.fixture
def comparison() -> Comparison:
    models = [
        model("cnn", 0.85, 3.0, 4_000_000),
        model("vit", 0.88, 1.0, 5_500_000, retrain_vs_recipe=1.0),
        model(
            ENSEMBLE,
            0.91,
            2.9,
            16_500_000,
            retrain_vs_recipe=2.75,
            ensemble=Ensemble("vit", ("t03", "t07", "t01"), 3),
        ),
    ]
    pairs = [
        PairedTest("cnn", "vit", Interval(-0.03, -0.06, 0.0), 0.09, 4, 9),
        PairedTest("cnn", ENSEMBLE, Interval(-0.06, -0.09, -0.03), 0.001, 2, 14),
        PairedTest("vit", ENSEMBLE, Interval(-0.03, -0.055, -0.005), 0.02, 3, 12),
    ]
    return Comparison("cmp", CLASSES, 300, models, pairs, recommend(models, pairs), 2000, {"ensemble": 3})


def section(lines: list[str], title: str) -> list[str]:
    start = next(i for i, line in enumerate(lines) if line.startswith(title))
    return lines[start : lines.index("", start)]


# ---------------------------------------------------------------- the report


def test_the_terminal_report_sets_the_ensemble_beside_its_single_model_with_its_cost(comparison):
    lines = table_lines(comparison)
    title, versus, cost, compute = section(lines, f"Ensemble {ENSEMBLE}")
    assert title == (
        f"Ensemble {ENSEMBLE}: the 3 best configurations of study cmp-vit (t03, t07, t01), each retrained, "
        "their calibrated probabilities averaged"
    )
    # From the ensemble's side: 3 points better than vit, McNemar's p as the pair holds it.
    assert versus == f"  {ENSEMBLE}: +3.0 points vs vit, 95 % CI [0.5, 5.5], p = 0.02 (significant)"
    assert cost == (
        "  3 forward passes per image: 3.0x vit's parameters (16.5 M), 2.9x its latency (2.9 vs 1.0 ms per image)"
    )
    # Training compute in recipe trainings: the retrain's (every member's) plus the search's, against vit's.
    assert compute == (
        "  training compute 13.0 recipe trainings (retrain 2.8 + search 10.2) vs vit's 11.2 recipe trainings "
        "(retrain 1.0 + search 10.2)"
    )
    assert lines[-1].startswith("Recommendation: ")


def test_the_ensemble_is_a_row_of_the_scores_costs_and_paired_tests(comparison):
    lines = table_lines(comparison)
    assert any(line.startswith(f"{ENSEMBLE} ") and "91.0 %" in line for line in lines)  # scores
    assert any(line.startswith(f"{ENSEMBLE} ") and "16.5 M" in line for line in lines)  # costs
    assert f"  {ENSEMBLE} beats vit by 3.0 points" in "\n".join(lines)  # the paired tests


def test_the_recommendation_weighs_the_ensemble_like_any_model(comparison):
    """Significantly more accurate than both: picked. Not significantly better than vit: vit, the faster, is."""
    assert comparison.recommendation.startswith(f"Pick {ENSEMBLE}: the most accurate")
    pairs = [*comparison.pairs[:2], replace(comparison.pairs[2], p_value=0.3)]
    assert recommend(comparison.models, pairs).startswith("Pick vit: 2.9x faster at inference")


def test_the_markdown_has_a_section_with_both_side_by_side(comparison):
    page = markdown(comparison)
    assert f"## Ensemble {ENSEMBLE}: the 3 best configurations of study cmp-vit" in page
    rows = [line for line in page.splitlines() if line.startswith(("| vit |", f"| {ENSEMBLE} |"))]
    single, ensemble = rows[-2:]
    assert single == (
        "| vit | 1 | 1 | 88.0 (85.0–91.0) | 0.050 (0.030–0.070) | - | - | 5.5 M | 1.0 | 1.0 | 10.2 | 11.2 |"
    )
    assert ensemble == (
        f"| {ENSEMBLE} | t03, t07, t01 | 3 | 91.0 (88.0–94.0) | 0.050 (0.030–0.070) | +3.0 [0.5, 5.5] | 0.02 "
        "| 16.5 M | 2.9 | 2.8 | 10.2 | 13.0 |"
    )
    assert f"- **{ENSEMBLE}** (study `cmp-vit`, final run `run-{ENSEMBLE}`): an ensemble of the study's trials" in page


def test_without_an_ensemble_the_report_and_its_file_are_as_before(comparison):
    singles = replace(comparison, models=comparison.models[:2], pairs=comparison.pairs[:1], settings={})
    assert not any(line.startswith("Ensemble") for line in table_lines(singles))
    assert "## Ensemble" not in markdown(singles)
    assert all(set(model) >= {"name", "costs"} for model in as_record(singles)["models"])
    assert not any({"ensemble", "retrain_vs_recipe"} & set(model) for model in as_record(singles)["models"])
    assert {"ensemble", "retrain_vs_recipe"} <= set(as_record(comparison)["models"][2])


def test_the_plots_draw_the_ensemble_as_one_more_model(comparison, tmp_path):
    from search.comparison.plots import write_plots
    from search.comparison.report import PLOT_FILES

    write_plots(comparison, tmp_path)
    assert all((tmp_path / name).read_bytes().startswith(b"\x89PNG") for name in PLOT_FILES)


def test_the_ensemble_s_cost_is_logged_as_metrics(comparison):
    metrics = {metric.key: metric.value for metric in comparison_metrics(comparison)}
    assert metrics[f"{ENSEMBLE}/forward_passes"] == 3
    assert metrics[f"{ENSEMBLE}/retrain_vs_recipe"] == 2.75
    assert metrics[f"{ENSEMBLE}/parameters"] == 16_500_000
    assert "vit/forward_passes" not in metrics and "vit/retrain_vs_recipe" not in metrics  # as before


# ---------------------------------------------------------------- which study, and the refusals


def config(model: str, **fields) -> StudyConfig:
    where = {"storage_path": "ray_results", "cache_dir": ".cache", "tracking_uri": "sqlite:///x.db", "experiment": "x"}
    return StudyConfig(
        name=f"cmp-{model}", model=model, data="synthetic:3", space="x.yaml", epochs=3, img_size=32, **where, **fields
    )


def test_the_ensemble_is_of_the_study_whose_winner_scored_best_on_validation_never_the_test():
    entries = [Entry("cnn", config("cnn"), "finished"), Entry("vit", config("vit"), "finished")]
    winners = {"cnn": SimpleNamespace(best_value=0.91), "vit": SimpleNamespace(best_value=0.93)}
    assert ensemble_study(entries, winners).label == "vit"  # type: ignore[arg-type]
    losses = [replace(entry, config=replace(entry.config, metric="val_loss")) for entry in entries]
    assert ensemble_study(losses, winners).label == "cnn"  # type: ignore[arg-type]  # val_loss: the lower
    unscored = {"cnn": SimpleNamespace(best_value=math.nan), "vit": SimpleNamespace(best_value=None)}
    assert ensemble_study(entries, unscored).label == "cnn"  # type: ignore[arg-type]  # a tie: the first


def test_an_ensemble_larger_than_a_study_s_trials_or_of_studies_with_other_metrics_is_refused():
    plan = Plan("cmp", [Entry("cnn", config("cnn", trials=4), "new"), Entry("vit", config("vit"), "new")], "x")
    check_ensemble(plan, None)
    check_ensemble(plan, 4)
    with pytest.raises(UsageError, match="--ensemble 5: study cmp-cnn has 4 trials"):
        check_ensemble(plan, 5)
    mixed = replace(plan, entries=[plan.entries[0], replace(plan.entries[1], config=config("vit", metric="val_loss"))])
    with pytest.raises(UsageError, match="optimise different metrics"):
        check_ensemble(mixed, 2)


def parent(tags: dict[str, str]) -> SimpleNamespace:
    return SimpleNamespace(data=SimpleNamespace(tags={"study": "cmp-vit", **tags}))


def test_continuing_a_comparison_with_another_ensemble_is_refused_as_another_budget_is():
    recorded = parent({"comparison_ensemble": ensemble_setting(3)})
    refuse_changed_ensemble("cmp", recorded, 3)
    with pytest.raises(UsageError, match=r"ran study cmp-vit with --ensemble 3, not 2; repeat its settings"):
        refuse_changed_ensemble("cmp", recorded, 2)
    with pytest.raises(UsageError, match="with --ensemble 3, without it"):
        refuse_changed_ensemble("cmp", recorded, None)
    with pytest.raises(UsageError, match="without --ensemble, not 3"):
        refuse_changed_ensemble("cmp", parent({"comparison_ensemble": ensemble_setting(None)}), 3)
    refuse_changed_ensemble("cmp", parent({}), 3)  # a study from before --ensemble existed: anything goes


def test_shared_settings_name_the_ensemble_only_where_asked():
    plan = Plan("cmp", [Entry("cnn", config("cnn"), "new"), Entry("vit", config("vit"), "new")], "x")
    assert shared_settings(plan, None, 3)["ensemble"] == 3
    assert "ensemble" not in shared_settings(plan, None)


def test_an_ensemble_of_one_is_refused_in_one_line_before_anything_runs(tmp_path, monkeypatch, capsys):
    from search.compare import main

    shutil.copytree(ROOT / "spaces", tmp_path / "spaces")
    args = ("--smoke", "--no-pretrained", "--data", "synthetic:3", "--ensemble", "1")
    answer = call_main(main, *args, cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert "--ensemble 1: an ensemble needs at least 2 members" in one_line_refusal(answer, "compare.py")
    assert not (tmp_path / "mlflow").exists() and not (tmp_path / "comparisons").exists()


def test_an_ensemble_larger_than_the_trials_is_refused_before_any_study_runs(tmp_path, monkeypatch, capsys):
    from search.compare import main

    shutil.copytree(ROOT / "spaces", tmp_path / "spaces")
    args = ("--smoke", "--no-pretrained", "--data", "synthetic:3", "--trials", "2", "--ensemble", "3")
    answer = call_main(main, *args, cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert "--ensemble 3: study compare-cnn has 2 trials" in one_line_refusal(answer, "compare.py")
    assert not (tmp_path / "ray_results").exists() and not (tmp_path / "comparisons").exists()


# ---------------------------------------------------------------- what it costs, measured


def test_an_ensemble_costs_its_members_parameters_and_trains_slower_than_each():
    """Two small vits (3 and 4 blocks): parameters summed, every member trained on an image one after another,
    latency through the scoring network it ships as. Few repeats: what it returns, not a good timing."""
    import torch

    from search.comparison.costs import measure_costs, measure_ensemble_costs
    from trainables.config import Hyperparameters
    from trainables.models import ModelSpec

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        hp = Hyperparameters(batch_size=4)
        specs = [
            ModelSpec("vit", 3, img_size=32, pretrained=False).with_knobs(replace(hp, vit_depth=d)) for d in (3, 4)
        ]
        quick = {"warmup": 1, "repeats": 2, "train_steps": 2}
        ensemble = measure_ensemble_costs([(spec, hp) for spec in specs], torch.device("cpu"), **quick)
        singles = [measure_costs(spec, hp, torch.device("cpu"), **quick) for spec in specs]
    finally:
        torch.set_num_threads(threads)
    assert ensemble.parameters == sum(single.parameters for single in singles)
    assert ensemble.train_images_per_s < min(single.train_images_per_s for single in singles)
    assert set(ensemble.latency_ms) == {1, 32} and all(ms > 0 for ms in ensemble.latency_ms.values())
    assert ensemble.device == "cpu" and ensemble.peak_train_memory is None


# ---------------------------------------------------------------- slow: the whole command


@pytest.mark.slow
def test_compare_sets_an_ensemble_of_the_best_validated_study_beside_the_single_models(tmp_path):
    """Two smoke studies of two trials (each completes: one epoch, no rung to stop it), their retrains and an
    ensemble of 2; then the same command with another --ensemble is refused, as another budget is."""
    from helpers import run_script
    from mlflow.tracking import MlflowClient

    from search.final_model.sources import load_study

    shutil.copytree(ROOT / "spaces", tmp_path / "spaces")
    command = ("--data", "synthetic:3", "--models", "vit", "cnn", "--trials", "2", "--epochs", "1", "--smoke")
    command += ("--no-pretrained", "--resamples", "1000", "--name", "ens")
    result = run_script("compare.py", *command, "--ensemble", "2", cwd=tmp_path, timeout=1500)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow/mlflow.db")
    studies = {
        run.data.tags["study"]: run
        for run in client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=1000)
        if "study" in run.data.tags and "role" not in run.data.tags and "mlflow.parentRunId" not in run.data.tags
    }
    best = max(studies, key=lambda name: load_study(f"sqlite:///{tmp_path}/mlflow/mlflow.db", name, None).best_value)
    label = ensemble_label(best.removeprefix("ens-"), 2)
    assert f"== {label}: retraining the 2 best configurations of study {best} as an ensemble" in result.stdout
    assert f"Ensemble {label}: the 2 best configurations of study {best}" in result.stdout
    assert all(run.data.tags["comparison_ensemble"] == "2" for run in studies.values())
    (comparison,) = [
        run
        for run in client.search_runs([client.get_experiment_by_name("comparisons").experiment_id])
        if run.data.tags.get("role") == "comparison"
    ]
    assert comparison.data.metrics[f"{label}/forward_passes"] == 2
    assert comparison.data.metrics[f"{label}/retrain_vs_recipe"] > 0
    ensemble_run = client.get_run(comparison.data.tags[f"final_run.{label}"])
    assert ensemble_run.data.metrics["ensemble_members"] == 2
    single_run = comparison.data.tags[f"final_run.{best.removeprefix('ens-')}"]
    assert single_run != ensemble_run.info.run_id  # the single retrain is not the ensemble's

    again = run_script("compare.py", *command, "--ensemble", "3", cwd=tmp_path, timeout=300)
    assert again.returncode == 2 and "with --ensemble 2, not 3" in again.stderr, again.stderr


class Runs:
    """An MLflow client's reads, as plan.py makes them, over runs given by hand (newest first)."""

    def __init__(self, *runs: SimpleNamespace):
        self.runs = runs
        self.filters: list[str] = []

    def search_experiments(self, view_type=None):
        return [SimpleNamespace(experiment_id="1")]

    def search_runs(self, experiment_ids, filter_string, max_results=None, order_by=None):
        self.filters.append(filter_string)
        wanted = (
            filter_string.split("metrics.ensemble_members = ")[1].split()[0]
            if "ensemble_members" in filter_string
            else None
        )
        return [run for run in self.runs if wanted is None or run.data.metrics.get("ensemble_members") == int(wanted)]

    def list_artifacts(self, run_id):
        return [SimpleNamespace(path="test_predictions.csv")]


def final_run(run_id: str, **metrics: float) -> SimpleNamespace:
    return SimpleNamespace(info=SimpleNamespace(run_id=run_id), data=SimpleNamespace(metrics=metrics, tags={}))


def test_a_single_retrain_is_never_taken_from_an_ensemble_or_a_flipped_run_nor_the_other_way():
    """The newest final runs are an ensemble of 3 and a --tta run: the single model is the older plain retrain."""
    from search.comparison.plan import finished_ensemble, finished_retrain

    client = Runs(
        final_run("tta", forward_passes=6.0, ensemble_members=3.0, tta_forward_passes=6.0),
        final_run("ensemble", forward_passes=3.0, ensemble_members=3.0),
        final_run("flipped", forward_passes=2.0, tta_forward_passes=2.0),
        final_run("single", trained_epochs=6.0),
    )
    assert finished_retrain(client, "cmp-vit", "test_predictions.csv") == "single"
    assert finished_ensemble(client, "cmp-vit", 3, "test_predictions.csv") == "ensemble"
    assert finished_ensemble(client, "cmp-vit", 2, "test_predictions.csv") is None
    assert all("tags.role = 'final'" in text and "tags.study = 'cmp-vit'" in text for text in client.filters)
