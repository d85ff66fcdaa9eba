"""The study's view of MLflow's runs page: saved as the UI's Share button saves one, opened by schema.runs_page.

MLflow 3 keeps a shared view as an experiment tag (mlflow.sharedViewState.<key>) holding the
page's state as JSON: its filter, sort, columns and charts. The study saves one under its own
name when it starts, and again with its importance charts when it ends, so the address it
prints opens on this study's runs, best first, and on charts of the trials' epochs first.

The keys are the UI's own (MLflow 3.17's runs page, server/js/build): the search facets (searchFilter,
orderByKey, orderByAsc) and of its UI state selectedColumns, columnOrder, columnWidths, runsHiddenMode,
compareRunCharts, compareRunSections, isAccordionReordered. An unknown key is ignored. A shared view drops
runsExpanded, runsPinned, runsHidden and runsVisibilityMap when it opens (so no row can be pinned: the winner
shows by its run's name, study_run.WINNER_SUFFIX), and no key formats a metric's digits (the table shows the
value as logged). What a view cannot say: the UI opens its Assistant panel by itself on a browser's first visit to
a local server; closed once, it stays closed.
"""

from __future__ import annotations

import json

from mlflow.tracking import MlflowClient

from search.records.study_config import StudyConfig
from search.tracking.schema import EPOCH_METRICS, FIDELITY_METRICS, SHARED_VIEW_TAG, STUDY_TAG
from trainables.config import COST_METRICS

TRIALS_SECTION, IMPORTANCE_SECTION = "trials", "importance"
SCORE_WIDTH_PX_PER_CHAR, SCORE_WIDTH_PADDING_PX = 8, 40
"""The best-score column's width, from its name: the whole name and the sort arrow show (the UI's default,
100 px, cuts best_val_balanced_acc)."""
LINE_CHART = {
    "type": "LINE",
    "runsCountToCompare": 100,
    "deleted": False,
    "isGenerated": True,
    "lineSmoothness": 0,
    "xAxisScaleType": "linear",
    "scaleType": "linear",
    "range": {},
    "xAxisKey": "step",
    "selectedXAxisMetricKey": "",
    "yAxisKey": "metric",
    "yAxisExpressions": [],
    "ignoreOutliers": False,
    "useGlobalXaxisKey": True,
    "useGlobalLineSmoothing": True,
}
"""A line chart of one metric per step (epoch) for every run shown, as the UI makes one."""
BAR_CHART = {"type": "BAR", "runsCountToCompare": 100, "deleted": False, "isGenerated": True}


def column(kind: str, key: str) -> str:
    """A column's (and a sort key's) name on the runs page: attributes.`Models`, metrics.`val_acc`, ..."""
    return f"{kind}.`{key}`"


def runs_view(config: StudyConfig, knobs: list[str], importances: tuple[str, ...] = ()) -> dict:
    """The page's state: this study's runs (its trials, its run, its final retrains), best first, with the best
    score as the first column after the run's name and start (in view beside the UI's Assistant panel at
    1600 px), then the final retrain's test score (the trials have none: a final run stands apart, below them),
    the model and the searched `knobs`; charts of every epoch metric (the searched one first), then of the
    knobs' importances when the study has them.

    No Dataset column: every run of a study has the same data, and its 300 px pushed the scores out of view."""
    best = f"best_{config.metric}"
    # Costs do not change from epoch to epoch: the one a multi-objective study trades against gets a chart
    # and a column, the others none.
    traded = [config.cost.metric] if config.cost else []
    # Nor does a chart of compute or image size per epoch say how a trial learns.
    learning = [key for key in EPOCH_METRICS if key != config.metric and key not in (*COST_METRICS, *FIDELITY_METRICS)]
    epoch_metrics = [config.metric, best, *learning, *traded]
    charts = [chart(LINE_CHART, TRIALS_SECTION, key, key) for key in epoch_metrics]
    charts += [chart(BAR_CHART, IMPORTANCE_SECTION, f"importance/{knob}", knob) for knob in importances]
    sections = [section(TRIALS_SECTION, "Trials, per epoch")]
    if importances:
        sections.append(section(IMPORTANCE_SECTION, "Importance of each knob (fANOVA)"))
    columns = [
        column("metrics", best),
        column("metrics", final_score(config.metric)),
        *(column("metrics", key) for key in traded),
        column("attributes", "Models"),
        *(column("params", knob) for knob in knobs),
    ]
    return {
        "searchFilter": f"tags.{STUDY_TAG} = '{config.name}'",
        "orderByKey": column("metrics", best),  # a run without it (a final retrain) sorts last
        "orderByAsc": config.mode == "min",
        "selectedColumns": columns,
        "columnOrder": columns,  # else the UI puts the metrics after its own attribute columns
        "columnWidths": {column("metrics", best): SCORE_WIDTH_PX_PER_CHAR * len(best) + SCORE_WIDTH_PADDING_PX},
        "runsHiddenMode": "SHOW_ALL",  # the UI draws the first 10 runs by default: a study has more trials
        "compareRunCharts": charts,
        "compareRunSections": sections,
        "isAccordionReordered": True,
    }


def final_score(metric: str) -> str:
    """What a final retrain logs of the searched metric, on the test split: val_acc -> test_acc."""
    return "test_" + metric.removeprefix("val_")


def chart(kind: dict, section_id: str, metric: str, title: str) -> dict:
    names = {"uuid": f"{section_id}-{metric}", "metricSectionId": section_id, "displayName": title}
    return {**kind, **names, "metricKey": metric}


def section(uuid: str, name: str) -> dict:
    return {"uuid": uuid, "name": name, "display": True, "isReordered": False, "deleted": False, "isGenerated": True}


def save_runs_view(client: MlflowClient, experiment_id: str, config: StudyConfig, view: dict) -> None:
    client.set_experiment_tag(experiment_id, SHARED_VIEW_TAG + config.name, json.dumps(view))
