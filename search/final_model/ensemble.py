"""final.py --ensemble K and --tta: which configurations make the ensemble, and whether it (or the flips) pays.

The members are the study's K best distinct configurations among the trials that completed their budget
(ASHA-stopped and failed trials are left out: an early score is no final one, as for --confirm): ranked by
their search score, or, where the study ran --confirm, the confirmed candidates first by their mean over
seeds (search.study.confirm), then the other completed trials by search score. The study's own winner (the
configuration final.py alone retrains) is always the first member, and the one the ensemble is judged
against. Two trials with the same hyperparameters (the seed aside) are one configuration.

The judgement is the paired one compare.py uses (search.evaluation.paired): the same test images, McNemar's
exact test and the paired bootstrap interval of the accuracy difference, said in one sentence.

The ensemble's probabilities are averaged (trainables.scoring.averaged_probabilities), not logits. An average
of calibrated members is under-confident, so one more temperature, T_ens, is fitted on val to the averaged
log-probabilities (never on the test's; 1 without --keep-val): they are tested through report.evaluate_test as
log-probabilities at temperature T_ens (softmax(log p / T_ens)), with a calibration record that says what T_ens
did to the average of the calibrated members (ensemble_calibration).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import yaml

from search.errors import UsageError, one_line
from search.evaluation.calibration import Calibration, calibrate
from search.evaluation.formatting import ci, fixed, p_text, percent, points
from search.evaluation.intervals import CONFIDENCE, RESAMPLES, Interval, stratified_resamples
from search.evaluation.paired import SIGNIFICANCE, PairedTest, paired_test
from search.evaluation.predictions import Predictions
from search.final_model.report import INTERVAL_SEED, HeldOutResult, evaluate_test
from search.records.trial_status import TrialStatus
from search.records.winner import Winner
from trainables.config import METRIC_MODES, SEED
from trainables.scoring import averaged_probabilities

MEMBERS_TABLE = "ensemble_members.json"
"""The final run's table artifact: a row per member (label, rank, search score, test accuracy, knobs)."""


# ---------------------------------------------------------------- which members


@dataclass(frozen=True)
class SearchedTrial:
    """A search trial as the ensemble's selection sees it (from its run in the study's record)."""

    label: str
    """t07."""
    run_id: str
    status: str
    """Its trial_status tag (TrialStatus)."""
    score: float | None
    """Its best search score (best_<metric>); None where it reported none."""
    hyperparameters: dict
    """Its hyperparameters.yaml; the seed, where a confirmation's retrain holds one, does not count."""
    confirmed_mean: float | None = None
    """Its mean over the confirmation's seeds, where the study confirmed it (--confirm); else None."""


def configuration_key(hyperparameters: dict) -> str:
    """What makes two trials one configuration: their hyperparameters, the seed aside, in a canonical form."""
    return json.dumps({k: v for k, v in hyperparameters.items() if k != SEED}, sort_keys=True, default=str)


def ranked_distinct(trials: Sequence[SearchedTrial], mode: str, first: str | None = None) -> list[SearchedTrial]:
    """The completed trials' distinct configurations, best first: the confirmed ones by their mean, then the others
    by their search score; `first` (the study's winner, by label) ahead of all where it is among them. Of trials
    with the same configuration the better ranked stands for it; ties keep the label order."""
    sign = -1.0 if mode == "max" else 1.0
    completed = [
        trial
        for trial in sorted(trials, key=lambda trial: trial.label)
        if trial.status == TrialStatus.COMPLETED and trial.score is not None and math.isfinite(trial.score)
    ]

    def rank(trial: SearchedTrial) -> tuple[int, int, float]:
        if trial.confirmed_mean is not None:
            return (trial.label != first, 0, sign * trial.confirmed_mean)
        return (trial.label != first, 1, sign * float(trial.score))  # type: ignore[arg-type]

    distinct: dict[str, SearchedTrial] = {}
    for trial in sorted(completed, key=rank):
        distinct.setdefault(configuration_key(trial.hyperparameters), trial)
    return list(distinct.values())


def choose_members(
    trials: Sequence[SearchedTrial], k: int, mode: str, study: str, first: str | None = None
) -> list[SearchedTrial]:
    """The K best distinct completed configurations (ranked_distinct); a one-line UsageError where there are fewer."""
    distinct = ranked_distinct(trials, mode, first)
    if k > len(distinct):
        raise UsageError(
            f"--ensemble {k}: study {study!r} has {len(distinct)} distinct configuration(s) that completed their "
            f"budget (pruned and failed trials, and repeats of one configuration, do not count): ask for at most "
            f"{len(distinct)}" + ("" if len(distinct) >= 2 else ", and an ensemble needs 2: run more trials")
        )
    return distinct[:k]


def study_members(tracking_uri: str, study: str, k: int, model: str | None = None) -> list[Winner]:
    """The configurations of study `study`'s K best distinct completed trials, best first, each as final.py reads
    one (the first the study's own winner, exactly as final.py --study reads it; the others as --run-id reads a
    trial). A one-line UsageError where the study has fewer, or where MLflow cannot be read."""
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import SQLAlchemyError

    from search.final_model.sources import load_run, winner_from_mlflow
    from search.tracking.store import mlflow_client

    winner = winner_from_mlflow(tracking_uri, study=study, model=model)
    assert winner.run_id is not None  # a study's winner is read from its parent run
    try:
        client = mlflow_client(tracking_uri, create=False)
        parent = client.get_run(winner.run_id)
        chosen = choose_members(
            searched_trials(client, parent), k, METRIC_MODES[winner.metric], study, winner.trial_name
        )
        return [
            winner if trial.label == winner.trial_name else load_run(tracking_uri, trial.run_id, model)
            for trial in chosen
        ]
    except (MlflowException, SQLAlchemyError) as error:
        raise UsageError(f"cannot read MLflow at {tracking_uri}: {one_line(error)}") from None


def searched_trials(client, parent) -> list[SearchedTrial]:
    """The study's search trials (not a confirmation's retrains) as its runs record them, with the confirmation's
    means where the study confirmed its best (--confirm). Only completed trials' configurations are read."""
    from search.study.confirm import WINNER_TAG, candidates, confirmed_scores
    from search.tracking.schema import CONFIRM_ROLE, PARENT_TAG, ROLE_TAG, STATUS_TAG, TRIAL_CONFIG, TRIAL_LABEL_TAG
    from search.tracking.store import read_artifact
    from search.tracking.study_run import read_study_config

    config = read_study_config(client, parent)
    experiment_id, parent_id = parent.info.experiment_id, parent.info.run_id
    means: dict[str, float] = {}
    if WINNER_TAG in parent.data.tags:  # the confirmation ran to its end: its ranking comes first
        chosen = candidates(client, experiment_id, parent_id, config)
        means = {row.label: row.mean for row in confirmed_scores(client, experiment_id, parent_id, config, chosen)}
    runs = client.search_runs([experiment_id], f"tags.`{PARENT_TAG}` = '{parent_id}'", max_results=50_000)
    trials = []
    for run in runs:
        tags = run.data.tags
        if tags.get(ROLE_TAG) == CONFIRM_ROLE or TRIAL_LABEL_TAG not in tags:
            continue
        status = tags.get(STATUS_TAG, "unknown")
        text = read_artifact(client, run.info.run_id, TRIAL_CONFIG) if status == TrialStatus.COMPLETED else None
        label = tags[TRIAL_LABEL_TAG]
        trials.append(
            SearchedTrial(
                label=label,
                run_id=run.info.run_id,
                status=status,
                score=run.data.metrics.get(f"best_{config.metric}"),
                hyperparameters=yaml.safe_load(text or "{}") or {},
                confirmed_mean=means.get(label),
            )
        )
    return trials


# ---------------------------------------------------------------- the members' probabilities


def log_probabilities(probabilities: np.ndarray) -> np.ndarray:
    """log p, as logits at temperature 1 (softmax(log p) = p); a probability that underflowed to 0 stays finite."""
    return np.log(np.clip(probabilities, np.finfo(np.float64).tiny, 1.0))


def ensemble_calibration(
    calibrated: np.ndarray,
    labels: np.ndarray,
    members: Sequence[Calibration],
    val: tuple[np.ndarray, np.ndarray] | None = None,
) -> Calibration:
    """The averaged probabilities' calibration record: its temperature T_ens, fitted on `val` (val's averaged
    calibrated probabilities and labels; None: T_ens = 1, nothing to fit on) to the log-probabilities, and
    measured on the test's `calibrated` average: 'before' the average of the calibrated members, 'after' it
    rescaled by T_ens. Fitted where the members were (val, or nowhere)."""
    fit_on = None if val is None else (log_probabilities(val[0]), val[1])
    record = calibrate((log_probabilities(calibrated), labels), fit_on=fit_on)
    fitted = members[0]
    return replace(
        record,
        split=fitted.split,
        fitted_on=fitted.fitted_on,
        fitted_all_right=record.fitted_all_right or any(member.fitted_all_right for member in members),
    )


def averaged_result(
    logits: Sequence[np.ndarray],
    calibrations: Sequence[Calibration],
    views: int,
    labels: np.ndarray,
    classes: list[str],
    val: tuple[Sequence[np.ndarray], np.ndarray] | None = None,
) -> HeldOutResult:
    """The test result of the members' probabilities averaged over their first `views` views (the image, then each
    flip): `logits` is each member's (views, N, C) test logits, `calibrations` each member's temperature fitted.
    `val`: each member's (views, N, C) val logits and val's labels (--keep-val), where T_ens is fitted (an
    average of several: ensemble_calibration); None, or one network's one view: T_ens = 1. The result's
    calibration.temperature is T_ens, which the model file keeps as its ensemble_temperature."""
    chosen = [member[:views] for member in logits]
    temperatures = [calibration.temperature for calibration in calibrations]
    calibrated = averaged_probabilities(chosen, temperatures)
    if len(chosen) * views == 1:  # one network's one view, calibrated already: a single model's record
        return evaluate_test(
            log_probabilities(calibrated),
            labels,
            classes,
            calibration=single_calibration(chosen[0][0], calibrated, labels, calibrations[0]),
        )
    averaged_val = None
    if val is not None:
        val_logits, val_labels = val
        averaged_val = (averaged_probabilities([member[:views] for member in val_logits], temperatures), val_labels)
    calibration = ensemble_calibration(calibrated, labels, calibrations, averaged_val)
    # An average: the report names each network's own temperature and T_ens.
    calibration = replace(calibration, averaged=len(chosen) * views)
    return evaluate_test(log_probabilities(calibrated), labels, classes, calibration=calibration)


def single_calibration(
    logits: np.ndarray, calibrated: np.ndarray, labels: np.ndarray, fitted: Calibration
) -> Calibration:
    """One network's calibration record as final.py writes a single model's ('before' its raw softmax, 'after'
    its own temperature), at temperature 1 on the calibrated log-probabilities that averaged_result tests."""
    after = calibrate((log_probabilities(calibrated), labels), fit_on=None)
    before = calibrate((logits, labels), fit_on=None)
    return replace(
        after,
        split=fitted.split,
        fitted_on=fitted.fitted_on,
        fitted_all_right=fitted.fitted_all_right,
        ece_before=before.ece_after,
        nll_before=before.nll_after,
        reliability_before=before.reliability_after,
    )


def member_calibration(val: np.ndarray | None, val_labels: np.ndarray | None, test: np.ndarray, labels: np.ndarray):
    """A member's temperature, fitted on its val logits of the image itself (never the test's), as final.py fits a
    single model's; None val: the member trained on val, temperature 1."""
    return calibrate((test, labels), fit_on=None if val is None or val_labels is None else (val, val_labels))


# ---------------------------------------------------------------- judged


@dataclass(frozen=True)
class Judged:
    """One model against another on the same test images, and the sentence that says it."""

    pair: PairedTest
    sentence: str

    def record(self) -> dict:
        """metrics.json's shape: difference, ci, p_value, significant, sentence."""
        difference = self.pair.difference
        return {
            "difference": difference.value,
            "ci": [difference.low, difference.high],
            "p_value": self.pair.p_value,
            "significant": self.pair.significant,
            "sentence": self.sentence,
        }

    def metrics(self, prefix: str) -> dict[str, float]:
        difference = self.pair.difference
        return {
            f"{prefix}_difference": difference.value,
            f"{prefix}_ci_low": difference.low,
            f"{prefix}_ci_high": difference.high,
            f"{prefix}_p_value": self.pair.p_value,
        }


def judgement(subject: str, baseline: str, pair: PairedTest) -> str:
    """'The ensemble of 3 is significantly better than t07 alone: +2.1 points (95 % CI [0.4, 3.9]), McNemar
    p = 0.012.' (or 'significantly worse than', or 'not significantly different from'); pair is subject - baseline."""
    difference = pair.difference
    if not pair.significant:
        verdict = "not significantly different from"
    else:
        verdict = "significantly better than" if difference.value > 0 else "significantly worse than"
    return (
        f"{subject} is {verdict} {baseline}: {points(difference.value, sign=True)} points "
        f"({ci(difference, CONFIDENCE)}), McNemar {p_text(pair.p_value)}."
    )


def judge(
    subject: str, baseline: str, a: HeldOutResult, b: HeldOutResult, keys: list[str], classes: list[str]
) -> Judged:
    """a (the subject) against b on the same test images (keys, in the results' order), with the resamples the
    test's intervals use."""
    resamples = stratified_resamples(a.labels, RESAMPLES, INTERVAL_SEED)
    pair = paired_test(
        subject,
        Predictions(keys, a.labels, a.probabilities, classes),
        baseline,
        Predictions(keys, b.labels, b.probabilities, classes),
        resamples,
    )
    return Judged(pair, judgement(subject, baseline, pair))


# ---------------------------------------------------------------- what is reported


@dataclass(frozen=True)
class MemberScore:
    """One member alone, as the card, metrics.json and the run's table show it."""

    label: str
    config_rank: int
    """Its configuration's rank among the study's distinct completed ones (1: the winner)."""
    search_score: float | None
    test_acc: Interval
    """Its own test accuracy (with the ensemble's flips, where --tta), with its interval."""
    test_ece: Interval
    temperature: float
    epochs: int
    trained_epochs: int
    hyperparameters: dict

    def record(self) -> dict:
        return {
            "label": self.label,
            "config_rank": self.config_rank,
            "search_score": self.search_score,
            "test_acc": self.test_acc.value,
            "test_acc_ci": [self.test_acc.low, self.test_acc.high],
            "test_ece": self.test_ece.value,
            "test_ece_ci": [self.test_ece.low, self.test_ece.high],
            "temperature": self.temperature,
            "epochs": self.epochs,
            "trained_epochs": self.trained_epochs,
            "hyperparameters": self.hyperparameters,
        }


@dataclass(frozen=True)
class Outcome:
    """What --ensemble and --tta made and what they are worth, judged on the test images."""

    members: tuple[MemberScore, ...]
    """Best first: the first is the study's winner, the single model the ensemble is judged against."""
    flips: tuple[str, ...]
    """--tta's flips ('hflip', 'vflip'); empty without --tta."""
    metric: str
    """The search metric the members' search scores are of."""
    test_acc: Interval
    """The shipped model's test accuracy (all members, with the flips), with its interval."""
    vs_best_member: Judged | None = None
    """The ensemble against its first member alone (both with the flips, where --tta); None for one member."""
    vs_without_tta: Judged | None = None
    """The shipped model with the flips against itself without them; None without --tta."""

    @property
    def forward_passes(self) -> int:
        """Forward passes per image: members x (1 + flips), as trainables.scoring.forward_passes counts them."""
        return len(self.members) * (1 + len(self.flips))

    @property
    def ensemble(self) -> bool:
        return len(self.members) > 1

    def record(self) -> dict:
        """metrics.json's keys 'ensemble' and 'tta', where each was asked for."""
        record: dict = {}
        if self.ensemble:
            assert self.vs_best_member is not None
            record["ensemble"] = {
                "k": len(self.members),
                "members": [member.record() for member in self.members],
                "best_member": self.members[0].label,
                "vs_best_member": self.vs_best_member.record(),
                "forward_passes": self.forward_passes,
            }
        if self.flips:
            assert self.vs_without_tta is not None
            record["tta"] = {
                "flips": list(self.flips),
                "forward_passes": self.forward_passes,
                "vs_without": self.vs_without_tta.record(),
            }
        return record

    def metrics(self) -> dict[str, float]:
        """The final run's metrics: the judgements, the cost, and each member's own test scores."""
        metrics: dict[str, float] = {"forward_passes": float(self.forward_passes)}
        if self.ensemble:
            assert self.vs_best_member is not None
            metrics["ensemble_members"] = float(len(self.members))
            metrics.update(self.vs_best_member.metrics("ensemble_vs_best"))
            for member in self.members:
                metrics[f"member_{member.label}_test_acc"] = member.test_acc.value
                metrics[f"member_{member.label}_test_acc_ci_low"] = member.test_acc.low
                metrics[f"member_{member.label}_test_acc_ci_high"] = member.test_acc.high
                metrics[f"member_{member.label}_test_ece"] = member.test_ece.value
                metrics[f"member_{member.label}_temperature"] = member.temperature
        if self.flips:
            assert self.vs_without_tta is not None
            metrics["tta_forward_passes"] = float(self.forward_passes)
            metrics.update(self.vs_without_tta.metrics("tta_vs_without"))
        return metrics

    def table(self) -> dict[str, list]:
        """ensemble_members.json: a row per member, its knobs as one JSON cell."""
        rows = [member.record() for member in self.members]
        columns = [key for key in rows[0] if key not in ("test_acc_ci", "test_ece_ci", "hyperparameters")]
        table = {key: [row[key] for row in rows] for key in columns}
        table["test_acc_ci_low"] = [member.test_acc.low for member in self.members]
        table["test_acc_ci_high"] = [member.test_acc.high for member in self.members]
        table["hyperparameters"] = [json.dumps(row["hyperparameters"], sort_keys=True) for row in rows]
        return table

    def sentences(self) -> list[str]:
        return [judged.sentence for judged in (self.vs_best_member, self.vs_without_tta) if judged is not None]

    def lines(self) -> list[str]:
        """final.py's closing lines: the members, the judgements and the cost."""
        lines = []
        if self.ensemble:
            shown = ", ".join(f"{m.label} {percent(m.test_acc.value)}" for m in self.members)
            temperatures = ", ".join(f"{m.label} {fixed(m.temperature, 3)}" for m in self.members)
            lines.append(f"Ensemble:   {len(self.members)} members alone on the test: {shown}")
            lines.append(f"            each calibrated on its own (temperatures {temperatures}), then averaged")
        if self.flips:
            lines.append(f"TTA:        averaged over the image and its {', '.join(self.flips)}")
        lines += [f"            {sentence}" for sentence in self.sentences()]
        lines.append(
            f"Cost:       {self.forward_passes} forward passes per image ({len(self.members)} member(s) x "
            f"{1 + len(self.flips)} view(s)), {self.forward_passes}x a single model's inference"
        )
        return lines

    def card_section(self) -> str:
        """The model card's section: the members beside the ensemble, the judgement sentences, the cost."""
        title = (
            "## Ensemble and test-time augmentation"
            if self.ensemble and self.flips
            else ("## Ensemble" if self.ensemble else "## Test-time augmentation")
        )
        parts = [title]
        if self.ensemble:
            flipped = " (each with the same flips)" if self.flips else ""
            parts.append(
                f"The model averages the calibrated probabilities of {len(self.members)} networks, the study's "
                f"{len(self.members)} best distinct configurations, each retrained as the winner is and calibrated "
                f"on its own. Each alone, on the same test images{flipped}:\n\n"
                f"| member | config rank | search {self.metric} | test accuracy | {round(100 * CONFIDENCE)} % CI | "
                f"temperature |\n|---|---|---|---|---|---|\n"
                + "\n".join(member_row(member) for member in self.members)
                + f"\n| **ensemble of {len(self.members)}** | | | {percent(self.test_acc.value)} | "
                f"[{percent(self.test_acc.low)}, {percent(self.test_acc.high)}] | |"
            )
        if self.flips:
            parts.append(
                f"Test-time augmentation: each network's probabilities are averaged over the image and its "
                f"{', '.join(self.flips)} (the flips the winner trained with)."
            )
        parts.append(" ".join(self.sentences()) + f" Significant means McNemar's p below {SIGNIFICANCE:g}.")
        parts.append(
            f"Cost: {self.forward_passes} forward passes per image, {self.forward_passes}x a single model's "
            f"inference time."
        )
        return "\n\n".join(parts)


def shipped_params(outcome: Outcome) -> dict[str, str]:
    """--ensemble and --tta as the final run's params: the members by label, best first, and the flips."""
    return {
        "ensemble": ",".join(member.label for member in outcome.members) if outcome.ensemble else "none",
        "tta": ",".join(outcome.flips) or "none",
    }


def trained_flips(hyperparameters: dict) -> tuple[str, ...]:
    """The flips a configuration trained with (hflip > 0, vflip > 0): what --tta averages over."""
    return tuple(flip for flip in ("hflip", "vflip") if float(hyperparameters.get(flip) or 0) > 0)


def member_row(member: MemberScore) -> str:
    """The card's row of one member: label, rank, search score, test accuracy and its interval, temperature."""
    score = fixed(member.search_score, 4) if member.search_score is not None else "n/a"
    accuracy = member.test_acc
    return (
        f"| {member.label} | {member.config_rank} | {score} | {percent(accuracy.value)} | "
        f"[{percent(accuracy.low)}, {percent(accuracy.high)}] | {fixed(member.temperature, 3)} |"
    )


def member_score(
    label: str,
    rank: int,
    search_score: float | None,
    result: HeldOutResult,
    calibration: Calibration,
    epochs: int,
    trained_epochs: int,
    hyperparameters: dict,
) -> MemberScore:
    """A member's row, from its own test result (alone) and its fitted calibration."""
    return MemberScore(
        label=label,
        config_rank=rank,
        search_score=search_score,
        test_acc=result.intervals["test_acc"],
        test_ece=result.intervals["test_ece"],
        temperature=calibration.temperature,
        epochs=epochs,
        trained_epochs=trained_epochs,
        hyperparameters=hyperparameters,
    )
