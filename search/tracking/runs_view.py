"""The study's view of MLflow's runs page: saved as the UI's Share button saves one, opened by schema.runs_page.

MLflow 3 keeps a shared view as an experiment tag (mlflow.sharedViewState.<key>) holding the
page's state as JSON: its filter, sort, columns and charts. The study saves one under its own
name when it starts, and again with its importance charts when it ends, so the address it
prints opens on this study's runs, best first, and on charts of the trials' epochs first.
The keys are the UI's own (MLflow 3.17's runs page); an unknown key is ignored by it.
"""

from __future__ import annotations

import json

from mlflow.tracking import MlflowClient

from search.study.config import StudyConfig
from search.tracking.schema import EPOCH_METRICS, SHARED_VIEW_TAG, STUDY_TAG
from trainables.config import COST_METRICS

TRIALS_SECTION, IMPORTANCE_SECTION = "trials", "importance"
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


def runs_view(config: StudyConfig, parent_id: str, knobs: list[str], importances: tuple[str, ...] = ()) -> dict:
    """The page's state: this study's runs (its trials, its run, its final retrains), best first, with the
    dataset, the model, the best score and the searched `knobs` as columns; charts of every epoch metric
    (the searched one first), then of the knobs' importances when the study has them."""
    best = f"best_{config.metric}"
    # Costs do not change from epoch to epoch: the one a multi-objective study trades against gets a chart
    # and a column, the others none.
    traded = [config.cost.metric] if config.cost else []
    learning = [key for key in EPOCH_METRICS if key != config.metric and key not in COST_METRICS]
    epoch_metrics = [config.metric, best, *learning, *traded]
    charts = [chart(LINE_CHART, TRIALS_SECTION, key, key) for key in epoch_metrics]
    charts += [chart(BAR_CHART, IMPORTANCE_SECTION, f"importance/{knob}", knob) for knob in importances]
    sections = [section(TRIALS_SECTION, "Trials, per epoch")]
    if importances:
        sections.append(section(IMPORTANCE_SECTION, "Importance of each knob (fANOVA)"))
    return {
        "searchFilter": f"tags.{STUDY_TAG} = '{config.name}'",
        "orderByKey": column("metrics", best),
        "orderByAsc": config.mode == "min",
        "selectedColumns": [
            column("attributes", "Dataset"),
            column("attributes", "Models"),
            column("metrics", best),
            *(column("metrics", key) for key in traded),
            *(column("params", knob) for knob in knobs),
        ],
        "runsExpanded": {parent_id: True},
        "runsHiddenMode": "SHOW_ALL",  # the UI draws the first 10 runs by default: a study has more trials
        "compareRunCharts": charts,
        "compareRunSections": sections,
        "isAccordionReordered": True,
    }


def chart(kind: dict, section_id: str, metric: str, title: str) -> dict:
    names = {"uuid": f"{section_id}-{metric}", "metricSectionId": section_id, "displayName": title}
    return {**kind, **names, "metricKey": metric}


def section(uuid: str, name: str) -> dict:
    return {"uuid": uuid, "name": name, "display": True, "isReordered": False, "deleted": False, "isGenerated": True}


def save_runs_view(client: MlflowClient, experiment_id: str, config: StudyConfig, view: dict) -> None:
    client.set_experiment_tag(experiment_id, SHARED_VIEW_TAG + config.name, json.dumps(view))
