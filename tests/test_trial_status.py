"""The trial-status vocabulary: one enum, whose strings are the ones MLflow records hold (and must keep holding)."""

from __future__ import annotations

from types import SimpleNamespace

from optuna.trial import TrialState

from search.records.trial_status import TrialStatus
from search.study.report import OUTCOMES
from search.study.tuning import OPTUNA_STATES
from search.tracking.schema import trial_outcome
from search.tracking.store import end_trial_run

RECORDED = ("completed", "pruned", "failed", "interrupted", "lost", "running")
"""The `trial_status` tag's words in studies already recorded: the report counts them in this order."""


def test_the_statuses_are_the_recorded_words_in_the_report_order():
    assert tuple(status.value for status in TrialStatus) == RECORDED
    assert OUTCOMES == RECORDED and all(type(outcome) is str for outcome in OUTCOMES)


def test_a_status_reads_and_compares_as_its_word():
    assert TrialStatus.LOST == "lost" and {"lost": 1}[TrialStatus.LOST] == 1
    assert (str(TrialStatus.PRUNED), f"{TrialStatus.PRUNED}", f"t07 {TrialStatus.FAILED}") == (
        "pruned",
        "pruned",
        "t07 failed",
    )
    assert TrialStatus("completed") is TrialStatus.COMPLETED


def test_how_a_trial_ended_is_a_status_optuna_knows():
    assert trial_outcome({"finished": True}, error=False) is TrialStatus.COMPLETED
    assert trial_outcome({"epoch": 1}, error=False) is TrialStatus.PRUNED
    assert trial_outcome(None, error=True) is TrialStatus.FAILED
    assert OPTUNA_STATES == {"completed": TrialState.COMPLETE, "pruned": TrialState.PRUNED, "failed": TrialState.FAIL}


class RecordingClient:
    def __init__(self):
        self.tags, self.names, self.ends = {}, [], []

    def set_tag(self, run_id, key, value):
        self.tags[key] = str(value)  # as MlflowClient.set_tag stores it

    def update_run(self, run_id, name=None, status=None):
        self.names.append(name)

    def set_terminated(self, run_id, status):
        self.ends.append(status)


def test_an_ended_trial_run_is_tagged_and_named_with_the_word():
    client = RecordingClient()
    run = SimpleNamespace(info=SimpleNamespace(run_id="r1"), data=SimpleNamespace(tags={"trial": "t07"}))
    end_trial_run(client, run, TrialStatus.INTERRUPTED)
    assert client.tags == {"trial_status": "interrupted"}
    assert (client.names, client.ends) == (["t07 interrupted"], ["KILLED"])
