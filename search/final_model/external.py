"""An external test: another site's images of the model's classes, tested whole, as the test split is.

    python search/final.py --study NAME --external DATA         # after the retrain, beside the test split
    python search/final.py --registered NAME/VERSION --external DATA   # a registered version, later

DATA (class folders, a manifest, train/val/test folders or the synthetic set) is indexed
whole (trainables.data.one_split: no split, every image tested), decoded at the model's
image size into the same cache as every split, and scored by the function that scores the
test split (report.evaluate_test): the same metrics, the same bootstrap intervals, the
same ECE. The temperature is the one fitted on val (the model file's); nothing is fitted
on external images. A source with fewer classes than the model (a site without a rare
class) is tested, and the record says which classes it lacks: ROC-AUC is then undefined
and macro F1 counts each missing class the model never predicted as 0. A class the model
does not know is refused, as is a missing source, before anything is written.

A registered version tested later gets a run of its own (role external; tags registered_model,
version, source_run_id; no study tag, which would make it look like a study's run) in the
experiment of the run that registered it, and a tag on the version (external.<digest>: the
run, its accuracy and interval), so that the registry's page of the version lists every
external test.
"""

from __future__ import annotations

import csv
import json
import tempfile
from dataclasses import dataclass, field, replace
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from mlflow.entities import Metric

from search.errors import UsageError
from search.evaluation.calibration import CALIBRATION_SPLIT, Calibration, LabelledLogits, measured
from search.evaluation.formatting import finite, fixed
from search.evaluation.intervals import Interval
from search.evaluation.operating_point import interval_text as rate_text
from search.evaluation.operating_point import rates_record, split_rates
from search.evaluation.predictions import Predictions, predictions_csv
from search.evaluation.subgroups import logged_metrics as subgroup_metrics
from search.evaluation.subgroups import summary_lines as subgroup_lines
from search.final_model.card import external_facts, external_tag
from search.final_model.report import (
    INTERVAL_SEED,
    SUMMARY_ROWS,
    HeldOutResult,
    evaluate_test,
    score_text,
    with_subgroups,
)
from search.tracking.registered import RegisteredModel, download_model_file, resolved_version
from search.tracking.schema import ROLE_TAG, mlflow_lines, run_page
from search.tracking.store import get_or_create_experiment, log_data_input, mlflow_client
from search.tracking.study_run import data_record
from trainables.checkpoint import ModelFile
from trainables.data import (
    EXTERNAL,
    CachedSplit,
    DataError,
    DatasetIndex,
    index_source,
    is_manifest,
    one_split,
    prepare_splits,
)

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion

EXTERNAL_ROLE = "external"
"""The role tag of a run that tests a registered version on an external set (final.py --registered)."""
EXTERNAL_CONTEXT = "external test"
"""The dataset input's context on the run: beside the final run's 'train and test'."""
EXTERNAL_PREDICTIONS_FILE = "external_predictions.csv"
EXTERNAL_PREFIX = "external_"
"""The run's external metrics: external_acc, external_acc_ci_low, ... (the test's test_acc, ...)."""


# ---------------------------------------------------------------- the data


@dataclass(frozen=True, kw_only=True)
class ExternalSet:
    """An external source, indexed whole and decoded: every image is a test image."""

    given: str
    """DATA as the user wrote it."""
    index: DatasetIndex
    """One split, EXTERNAL; its classes are the model's, in output order (labels remapped to them)."""
    images: CachedSplit
    missing: tuple[str, ...]
    """The model's classes the source has no image of."""
    skipped: tuple[str, ...] = ()
    """Images that would not decode (left out, as in every split)."""
    subgroups: tuple[str, ...] = ()
    """The study's subgroup columns (run.py --subgroups) that the source, a manifest, has too: read per image."""

    @cached_property
    def record(self) -> dict:
        """data_record of the index: its name and digest (every file's size and time, read once)."""
        return data_record(self.index)

    @property
    def dataset(self) -> dict:
        """The source as the run's MLflow dataset input: name, digest, profile."""
        record = self.record
        per_class = np.bincount(self.index.labels(EXTERNAL), minlength=len(self.index.classes))
        profile: dict[str, object] = {
            "num_classes": len(self.index.classes) - len(self.missing),
            "num_images": len(self.images),
            "per_class": dict(zip(self.index.classes, map(int, per_class), strict=True)),
        }
        return {**record, "profile": json.dumps(profile)}

    @property
    def digest(self) -> str:
        return self.record["digest"]

    @property
    def name(self) -> str:
        return self.record["name"]


def prepare_external(
    data: str,
    classes: list[str],
    img_size: int,
    cache_dir: str | Path,
    subgroups: tuple[str, ...] = (),
    window: tuple[float, float] | None = None,
) -> ExternalSet:
    """DATA indexed whole, checked against the model's classes and decoded at its image size (its DICOM images with
    the model's `window`, as in training); every problem a one-line UsageError, before anything is written.
    `subgroups`: the study's subgroup columns, read where DATA is a manifest that has them."""
    columns = columns_held(data, subgroups)
    try:
        whole = one_split(
            index_source(data, seed=0, subgroups=columns, window=window)
        )  # the seed cuts nothing: every image is kept
    except DataError as error:
        raise UsageError(f"--external {data}: {error}") from None
    refuse_unknown_classes(whole, classes, data)
    try:  # decoded as the source is (a synthetic set's images depend on its own classes), then relabelled
        decoded, cached, skipped = prepare_splits(whole, (EXTERNAL,), img_size, Path(cache_dir).resolve())
    except DataError as error:
        raise UsageError(f"--external {data}: {error}") from None
    index, missing = in_model_order(decoded, classes)
    return ExternalSet(
        given=data,
        index=index,
        images=replace(cached[EXTERNAL], labels=index.labels(EXTERNAL)),
        missing=missing,
        skipped=tuple(skipped),
        subgroups=columns,
    )


def columns_held(data: str, subgroups: tuple[str, ...]) -> tuple[str, ...]:
    """The subgroup columns that DATA's header has, where DATA is a manifest: another site may record fewer
    (or none), and is tested whole all the same; the manifest's own checks come after, in index_source."""
    if not subgroups or not is_manifest(data) or not Path(data).is_file():
        return ()
    try:
        with open(data, encoding="utf-8-sig", newline="") as file:
            header = next(csv.reader(file), [])
    except (OSError, UnicodeDecodeError):
        return ()  # index_source says what is wrong with the file
    held = {cell.strip().lower() for cell in header}
    return tuple(column for column in subgroups if column.lower() in held)


def refuse_unknown_classes(index: DatasetIndex, classes: list[str], given: str) -> None:
    """A class the model does not know is refused: the model would give it some other class, and every score
    would count that as its error."""
    unknown = [name for name in index.classes if name not in classes]
    if unknown:
        shown = ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else "")
        known = ", ".join(classes[:20]) + (" ..." if len(classes) > 20 else "")
        raise UsageError(
            f"--external {given} has class(es) the model was not trained on ({shown}): its classes are {known}; "
            f"leave those images out (a source with fewer of the model's classes is tested as it is)"
        )


def in_model_order(index: DatasetIndex, classes: list[str]) -> tuple[DatasetIndex, tuple[str, ...]]:
    """The index with the model's classes, its labels the model's output columns; the model's classes it lacks.
    A source's own classes are sorted names (folders) or its labels: a subset of the model's would number them
    otherwise, so every label is mapped by name."""
    column = [classes.index(name) for name in index.classes]
    samples = [replace(sample, label=column[sample.label]) for sample in index.splits[EXTERNAL]]
    present = {name for name in index.classes}
    missing = tuple(name for name in classes if name not in present)
    return replace(index, classes=list(classes), splits={EXTERNAL: samples}), missing


# ---------------------------------------------------------------- the evaluation


def fixed_calibration(test: LabelledLogits, temperature: float, fitted: Calibration | None = None) -> Calibration:
    """A temperature fitted elsewhere (on val, by the final run: `fitted`, where at hand) measured on external
    images, never refitted on them. Without `fitted` (a model file holds its temperature alone): temperature 1
    is the uncalibrated model (split None), any other was fitted on val, as final.py fits it."""
    if fitted is not None:
        split, fitted_on, all_right = fitted.split, fitted.fitted_on, fitted.fitted_all_right
    else:
        split, fitted_on, all_right = (None if temperature == 1.0 else CALIBRATION_SPLIT), 0, False
    return measured(test, temperature, split=split, fitted_on=fitted_on, fitted_all_right=all_right)


@dataclass(frozen=True, kw_only=True)
class ExternalResult:
    """The external set's scores, as the test split's (HeldOutResult), with what they are compared to."""

    data: ExternalSet
    result: HeldOutResult
    """test_* keys inside: the same function scored it; `metrics()` names them external_*."""
    internal: HeldOutResult | None = None
    """The internal test split's result, to compare with (None for a registered version tested later)."""
    internal_metrics: dict[str, float] | None = None
    """The internal test's scores and intervals as metrics.json holds them, where `internal` is not at hand."""
    extra: dict = field(default_factory=dict)
    """Records of the features that ran beside (operating_point, subgroups), as metrics.json's external holds them."""
    operating_rates: dict[str, Interval] | None = None
    """Sensitivity and specificity at the model's operating point (chosen on val), on these images; None: none."""
    operating_positive: str | None = None
    """The class the operating point flags."""

    def metrics(self) -> dict[str, float]:
        """external_acc, ..., external_acc_ci_low, external_acc_ci_high, ..., external_images: the run's metrics."""
        scores = {EXTERNAL_PREFIX + key.removeprefix("test_"): value for key, value in self.result.metrics.items()}
        for key, interval in self.result.intervals.items():
            name = EXTERNAL_PREFIX + key.removeprefix("test_")
            scores[f"{name}_ci_low"], scores[f"{name}_ci_high"] = interval.low, interval.high
        scores[EXTERNAL_PREFIX + "images"] = float(len(self.result.labels))
        for name, interval in (self.operating_rates or {}).items():
            key = f"{EXTERNAL_PREFIX}op_{name}"  # as the test's op_test_sensitivity
            scores[key], scores[f"{key}_ci_low"], scores[f"{key}_ci_high"] = interval.value, interval.low, interval.high
        if self.result.subgroups is not None:
            scores.update({EXTERNAL_PREFIX + k: v for k, v in subgroup_metrics(self.result.subgroups).items()})
        return scores

    def record(self) -> dict:
        """metrics.json's "external": source, digest, images, metrics, intervals, and the rest that ran."""
        result, calibration = self.result, self.result.calibration
        record = {
            "source": self.data.index.source,
            "digest": self.data.digest,
            "images": len(result.labels),
            "metrics": {key.removeprefix("test_"): value for key, value in result.metrics.items()},
            "intervals": {
                key.removeprefix("test_"): [interval.low, interval.high] for key, interval in result.intervals.items()
            },
            "missing_classes": list(self.data.missing),
            "skipped_images": len(self.data.skipped),
            "calibration": {
                "temperature": calibration.temperature,
                "split": calibration.split,  # where it was fitted: val (the final run's) or None, never these images
                "ece_before": calibration.ece_before,
                "ece_after": calibration.ece_after,
            },
            "per_class": result.per_class,
            "confusion_matrix": result.confusion.tolist(),
            "compared_with_test": [row.to_dict() for row in self.comparison()],
        }
        return {**record, **self.extra}

    def comparison(self) -> list[Difference]:
        """Each score beside the internal test's (None where that is not known: a version's run without it)."""
        internal = self.internal_scores() or {}
        rows = []
        for label, key in SUMMARY_ROWS:
            value = self.result.metrics[key]
            interval = self.result.intervals.get(key)
            test_value = internal.get(key)
            rows.append(
                Difference(
                    key=key.removeprefix("test_"),
                    label=label,
                    test=test_value,
                    external=value,
                    low=None if interval is None else interval.low,
                    high=None if interval is None else interval.high,
                )
            )
        return rows

    def internal_scores(self) -> dict[str, float] | None:
        if self.internal is not None:
            return self.internal.metrics
        return self.internal_metrics


SHOWN_DIGIT = 1e-4
"""The last digit the report and the card show a score to (4 decimals)."""


@dataclass(frozen=True)
class Difference:
    """One score on the external set beside the internal test's."""

    key: str
    """acc, balanced_acc, ..."""
    label: str
    test: float | None
    """The internal test's value; None where not known."""
    external: float
    low: float | None
    """The external score's interval (None: a metric without one, the loss)."""
    high: float | None

    @property
    def worse(self) -> bool:
        """The external interval lies wholly on the worse side of the internal value: a drop beyond chance. ECE and
        the loss are better low; an undefined (NaN) score or interval is never called worse."""
        if self.low is None or self.high is None or not (finite(self.low) and finite(self.high)):
            return False
        if self.test is None or not finite(self.test):
            return False
        if abs(self.external - self.test) < SHOWN_DIGIT / 2:  # a drop the report prints as +0.0000 is no drop
            return False
        lower_is_better = self.key in ("ece", "loss")
        return self.low > self.test if lower_is_better else self.high < self.test

    def to_dict(self) -> dict:
        return {
            "metric": self.key,
            "test": self.test,
            "external": self.external,
            "difference": None if self.test is None else self.external - self.test,
            "worse_beyond_interval": self.worse,
        }


def evaluate_external(
    data: ExternalSet,
    logits: np.ndarray,
    labels: np.ndarray,
    temperature: float,
    *,
    internal: HeldOutResult | None = None,
    internal_metrics: dict[str, float] | None = None,
    positive: int | None = None,
    operating_point: dict | None = None,
) -> ExternalResult:
    """The external set's logits scored as the test split's, at `temperature` (fitted on val, never here);
    `internal`: the final run's test result (its calibration says where the temperature was fitted), or
    `internal_metrics`: a registered version's final run's test metrics, to compare with. `operating_point`: the
    threshold as model.pt holds it (positive, threshold, ...), measured here, never chosen here; `positive`: the
    class the subgroups' sensitivity and specificity are of (--positive), or None."""
    fitted = internal.calibration if internal is not None else None
    calibration = fixed_calibration((logits, labels), temperature, fitted)
    classes = data.index.classes
    result = evaluate_test(logits, labels, classes, calibration=calibration)
    extra: dict = {}
    rates = None
    if operating_point is not None:
        flagged = classes.index(operating_point["positive"])
        threshold = float(operating_point["threshold"])
        rates = split_rates(result.probabilities, labels, flagged, threshold, INTERVAL_SEED)
        # As metrics.json's operating_point, its "test" part only (here: these images), with the rule applied.
        extra["operating_point"] = {
            "positive": operating_point["positive"],
            "threshold": threshold,
            "test": rates_record(rates),
        }
    if data.subgroups:
        samples = data.index.splits[EXTERNAL]
        values = {column: [sample.attribute(column) for sample in samples] for column in data.subgroups}
        result = with_subgroups(result, values, positive, classes)
        assert result.subgroups is not None
        extra["subgroups"] = result.subgroups.to_dict()
    return ExternalResult(
        data=data,
        result=result,
        internal=internal,
        internal_metrics=internal_metrics,
        extra=extra,
        operating_rates=rates,
        operating_positive=None if operating_point is None else str(operating_point["positive"]),
    )


# ---------------------------------------------------------------- into MLflow and files


def log_external(client, run_id: str, external: ExternalResult, out: Path) -> None:
    """The external metrics, the source as a dataset input (context 'external test') and the per-image
    predictions (external_predictions.csv, in out and on the run)."""
    stamp = int(datetime.now().timestamp() * 1000)
    scores = external.metrics()
    client.log_batch(run_id, metrics=[Metric(k, float(v), stamp, 0) for k, v in scores.items() if v == v])  # no NaN
    log_data_input(client, run_id, external.data.dataset, context=EXTERNAL_CONTEXT)
    out.mkdir(parents=True, exist_ok=True)
    path = out / EXTERNAL_PREDICTIONS_FILE
    result, data = external.result, external.data
    keys = [sample.key for sample in data.index.splits[EXTERNAL]]  # the cached split's order: the result's rows
    path.write_text(predictions_csv(Predictions(keys, result.labels, result.probabilities, data.index.classes)))
    client.log_artifact(run_id, str(path))


def summary_lines(external: ExternalResult) -> list[str]:
    """The closing report's lines: the external scores with intervals, beside the internal test's."""
    data, result = external.data, external.result
    calibration = result.calibration
    temperature = (
        f"at the temperature fitted on val ({calibration.temperature:.3f}; nothing fitted on them)"
        if calibration.calibrated
        else "uncalibrated (temperature 1), as the test split"
    )
    lines = [
        f"External test: {len(result.labels)} images of {data.name} (digest {data.digest}), tested whole {temperature}"
    ]
    internal = {row.key: row for row in external.comparison()}
    for label, key in SUMMARY_ROWS:
        text = score_text(result, key)
        row = internal.get(key.removeprefix("test_"))
        if row is not None and row.test is not None:
            text += f"   test {fixed(row.test, 4)}, {row.external - row.test:+.4f}"
            if row.worse:
                text += "  worse than the test beyond the interval"
        lines.append(f"  {label:<20}{text}")
    if data.missing:
        lines.append(
            f"  no image of {len(data.missing)} of the model's classes ({', '.join(data.missing[:5])}"
            f"{' ...' if len(data.missing) > 5 else ''}): ROC-AUC undefined, macro F1 counts them as 0"
        )
    if data.skipped:
        lines.append(f"  skipped {len(data.skipped)} unreadable image(s), e.g. {', '.join(data.skipped[:3])}")
    for name, interval in (external.operating_rates or {}).items():
        positive = external.operating_positive
        lines.append(f"  {name:<20}{rate_text(interval)} at the operating point (positive {positive})")
    if result.subgroups is not None:
        lines += ["  " + line for line in subgroup_lines(result.subgroups)]
    return lines


# ---------------------------------------------------------------- a registered version, tested later


@dataclass(frozen=True, kw_only=True)
class PreparedRegistered:
    """A registered version and an external set, checked: what final.py --registered runs."""

    model: RegisteredModel
    version: ModelVersion
    """MLflow's: name, version, run_id (the final run that registered it)."""
    model_file: ModelFile
    data: ExternalSet
    tracking_uri: str
    out: Path
    internal_metrics: dict[str, float] | None
    """The version's final run's test scores (test_acc, ...), to compare with; None where the run is gone."""
    experiment_id: str | None
    """The experiment of the version's final run: the new run goes beside it; None: the model's name's."""


def prepare_registered(
    model: RegisteredModel, data: str, tracking_uri: str, cache_dir: str, out: str | None
) -> PreparedRegistered:
    """The version found, its model.pt fetched and read, DATA checked against its classes and decoded: every
    problem a one-line UsageError, before anything is written to MLflow or --out."""
    client, version = resolved_version(model, tracking_uri)
    with tempfile.TemporaryDirectory(prefix="external-model-") as folder:
        where = f"{model} (version {version.version})"
        path = download_model_file(client, version, tracking_uri, Path(folder), where)
        try:
            model_file = ModelFile.load(path)
        except Exception:  # not a model file: an older or foreign artifact under that name
            raise UsageError(f"{where}: its {path.name} is not a model file written by search/final.py") from None
    refuse_averaged(model_file, where)
    external = prepare_external(
        data, list(model_file.classes), model_file.spec.img_size, cache_dir, window=model_file.window
    )
    source_run = client.get_run(version.run_id) if version.run_id else None
    if source_run is not None:
        experiment_id = source_run.info.experiment_id
        internal = {k: v for k, v in source_run.data.metrics.items() if k.startswith("test_")}
    else:  # a version logged without a run: its model's experiment, made when the run is (nothing written yet)
        experiment_id, internal = None, None
    stamp = f"{datetime.now():%Y%m%d-%H%M%S}"
    return PreparedRegistered(
        model=model,
        version=version,
        model_file=model_file,
        data=external,
        tracking_uri=tracking_uri,
        out=Path(out or f"final/{version.name}-v{version.version}-external-{stamp}"),
        internal_metrics=internal or None,
        experiment_id=experiment_id,
    )


def refuse_averaged(model_file: ModelFile, where: str) -> None:
    """An ensemble or a model with test-time flips averages probabilities the external test does not yet compute:
    refused, rather than scoring its first member alone."""
    members, flips = len(model_file.members), model_file.tta
    if members > 1 or flips:
        what = f"an ensemble of {members}" if members > 1 else f"a model with test-time {', '.join(flips)}"
        raise UsageError(
            f"{where} is {what}: --registered --external tests single models without flips only; test a single "
            f"model of the study, or score DATA with predict.py (its CSV holds the ensemble's probabilities)"
        )


def registered_logits(model_file: ModelFile, split: CachedSplit) -> LabelledLogits:
    """The split's logits from the model file's weights, through the engine's own evaluation (Learner.predict)."""
    from trainables.engine import Learner, select_device
    from trainables.models import build_model

    spec = replace(model_file.spec, pretrained=False)  # the weights come from the file, not from timm
    network = build_model(spec)
    network.load_state_dict(model_file.weights)
    learner = Learner(network, model_file.hyperparameters, select_device())
    with torch.no_grad():
        logits, labels = learner.predict(split)
    return logits.numpy(), labels


def execute_registered(prepared: PreparedRegistered) -> int:
    """Score the external set, log a run of role external in the version's experiment, tag the version with it,
    write metrics.json and the predictions into --out; the closing lines."""
    version, model_file = prepared.version, prepared.model_file
    logits, labels = registered_logits(model_file, prepared.data.images)
    point = model_file.operating_point  # chosen on val by the final run: measured here, never chosen again
    external = evaluate_external(
        prepared.data,
        logits,
        labels,
        model_file.temperature,
        internal_metrics=prepared.internal_metrics,
        positive=None if point is None else list(model_file.classes).index(point["positive"]),
        operating_point=point,
    )
    client = mlflow_client(prepared.tracking_uri)
    tags = {
        ROLE_TAG: EXTERNAL_ROLE,
        "registered_model": version.name,
        "version": str(version.version),
        "source_run_id": version.run_id or "",
        "model": model_file.spec.name,
        "mlflow.note.content": (
            f"External test of {version.name} version {version.version} on {len(labels)} images of "
            f"{prepared.data.name}: no training; the version's model.pt at its temperature."
        ),
    }
    experiment_id = prepared.experiment_id or get_or_create_experiment(
        client, model_file.spec.name, prepared.tracking_uri
    )
    run = client.create_run(experiment_id, run_name=f"{version.name}-v{version.version}-external", tags=tags).info
    status = "FAILED"
    try:
        log_external(client, run.run_id, external, prepared.out)
        metrics_file = prepared.out / "metrics.json"
        metrics_file.write_text(
            json.dumps(
                {
                    "external": external.record(),
                    "registered_model": {"name": version.name, "version": int(version.version)},
                    "mlflow": {"tracking_uri": prepared.tracking_uri, "run_id": run.run_id},
                },
                indent=2,
            )
        )
        client.log_artifact(run.run_id, str(metrics_file))
        key, value = external_tag(external_facts(external), run.run_id)
        client.set_model_version_tag(version.name, str(version.version), key, value)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        print(f"\nstopped: external test of {version.name} version {version.version} interrupted")
        return 130
    finally:
        client.set_terminated(run.run_id, status)
    print()
    for line in summary_lines(external):
        print(line)
    print(f"Version:    {version.name} version {version.version} tagged {key} (the registry's page of the version)")
    print(f"Results:    {prepared.out}/ (metrics.json, {EXTERNAL_PREDICTIONS_FILE})")
    print(
        "\n".join(mlflow_lines(prepared.tracking_uri, run_page(prepared.tracking_uri, run.experiment_id, run.run_id)))
    )
    return 0
