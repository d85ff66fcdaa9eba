"""From a winner's config to a tested, registered model: prepare (check and cache), then execute.

`prepare_final` does everything that can fail on bad input (the config's source, the
model, the data and its classes, pretrained weights) before anything is written to
MLflow; `execute_final` opens the final run, trains through the search's engine
(`fit`, the one loop), tests once on the split the search held out, writes the
results folder, logs it all and registers the model.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from mlflow.entities import Metric
from torch import nn
from tqdm import tqdm

from search.cli import bars_wanted, require_pretrained
from search.errors import UsageError, one_line
from search.evaluation.calibration import CALIBRATION_SPLIT, Calibration, LabelledLogits, softmax
from search.evaluation.operating_point import OperatingPoint, operating_point
from search.evaluation.predictions import PREDICTIONS_FILE, Predictions, predictions_csv
from search.evaluation.subgroups import SUBGROUP_TABLE, table_columns
from search.final_model.card import (
    DESCRIPTION_LIMIT,
    MODEL_CARD_FILE,
    CardFacts,
    card_facts,
    card_markdown,
    card_tags,
)
from search.final_model.checklist import CHECKLIST_FILE, checklist_markdown, checklist_tag
from search.final_model.ensemble import (
    MEMBERS_TABLE,
    Outcome,
    averaged_result,
    judge,
    log_probabilities,
    member_calibration,
    member_score,
    shipped_params,
)
from search.final_model.export import ONNX_FILE, ExportMismatch, export_onnx
from search.final_model.external import (
    ExternalResult,
    ExternalSet,
    evaluate_external,
    log_external,
    prepare_external,
)
from search.final_model.external import summary_lines as external_lines
from search.final_model.registry import attach_checklist, describe_version, log_model
from search.final_model.report import (
    INTERVAL_SEED,
    PER_CLASS_TABLE,
    HeldOutResult,
    evaluate_test,
    held_out_record,
    logged_metrics,
    per_class_table,
    plot_confusion,
    plot_reliability,
    summary_lines,
    with_subgroups,
)
from search.final_model.sources import study_leaks, study_split_record
from search.final_model.study_split import retrain_index
from search.records.operating_point import OperatingTarget
from search.records.registration import Registration
from search.records.retrain import RetrainRequest, RetrainSettings
from search.records.study_config import FULL
from search.records.winner import Winner
from search.tracking.schema import FINAL_MODEL_FILE, FINAL_ROLE, ROLE_TAG, STUDY_TAG, mlflow_lines, run_page
from search.tracking.store import get_or_create_experiment, log_data_input, log_params, mlflow_client
from search.tracking.study_run import data_record
from trainables.checkpoint import Member, ModelFile
from trainables.data import CachedSplit, DataError, DatasetIndex, index_source, prepare_splits
from trainables.engine import (
    EVAL_BATCH_FACTOR,
    EpochResult,
    Learner,
    NonFiniteLoss,
    batch_count,
    epoch_batches,
    fit,
    select_device,
)
from trainables.models import build_model
from trainables.scoring import averaged_probabilities, flipped_images, scoring_network
from trainables.spec import REFERENCE, ModelSpec, backbones_of, validate_spec

EXPORT_FAILED = 1
"""final.py's exit status when the retrain was registered but --export's file failed (and was left out)."""
METRICS_FILE = "metrics.json"
"""The final run's record of its test (held_out_record), settings and registration; the checklist reads it back."""
EXPORT_FAILED_TAG = "export_failed"
"""The final run's tag saying why --export's file is missing."""
RESULT_FILES = (
    "config.yaml",
    "classes.json",
    "splits.json",
    "classification_report.txt",
    "confusion_matrix.png",
    "reliability_diagram.png",
    PREDICTIONS_FILE,
)


@dataclass(frozen=True, kw_only=True)
class PreparedFinal:
    config: Winner
    spec: ModelSpec
    index: DatasetIndex
    """The study's split (its split.json's images, or, for a study without one, cut again with its seed), plus
    'trainval'."""
    train: CachedSplit
    """train+val, or train alone with --keep-val."""
    val: CachedSplit | None
    """The validation split to early-stop on (--keep-val), else None."""
    test: CachedSplit
    epochs: int
    seed: int
    tracking_uri: str
    experiment: str | None
    """An experiment name to use instead of the study's."""
    register_name: str | None
    """The registered model's name; None for a reference model, which is compared, not shipped."""
    out: Path
    label: str
    """The study's name (or the config file's stem): names the run and the results folder."""
    settings: RetrainSettings
    """What the final run records as params and in metrics.json: enough to repeat it."""
    skipped_images: list[str]
    tags: dict[str, str] = field(default_factory=dict)
    """Tags the run gets on top of the usual ones (compare.py marks its reference model with them)."""
    export: str | None = None
    """A format to write the model in as well (final.py --export): 'onnx', or None."""
    positive: int | None = None
    """The index (in config.classes) of the --positive class, or None where none was named."""
    operating_point: OperatingTarget | None = None
    """--operating-point: the rate the threshold on the positive class's probability must reach on val."""
    external: ExternalSet | None = None
    """--external's images, indexed whole and decoded at the model's size; None without it."""
    more_members: tuple[PreparedFinal, ...] = ()
    """final.py --ensemble: the other members, best first, each prepared as final.py prepares one (its own
    configuration, spec and epochs; the same data, split, seed rule and calibration). Empty: one model."""
    tta: tuple[str, ...] = ()
    """final.py --tta: the flips ('hflip', 'vflip') whose probabilities are averaged with the image's own at test
    time, in the test and in the model file. Empty: none."""

    @property
    def members(self) -> tuple[PreparedFinal, ...]:
        """Every network to train, this one (the study's winner) first."""
        return (self, *self.more_members)

    @property
    def averaged(self) -> bool:
        """An ensemble, or flips at test time: the test scores averaged probabilities (test_ensemble)."""
        return bool(self.more_members or self.tta)


@dataclass(frozen=True)
class Shipped:
    """What --ensemble or --tta ship: the model file's members (weights, spec, temperature), the average's own
    temperature and what they are worth."""

    members: tuple[Member, ...]
    outcome: Outcome
    ensemble_temperature: float = 1.0
    """T_ens, fitted on val to the averaged log-probabilities (--keep-val); 1 where nothing was fitted."""


# ---------------------------------------------------------------- prepare


def prepare_members(request: RetrainRequest, members: list[Winner], tta: tuple[str, ...] = ()) -> PreparedFinal:
    """final.py's retrain of `members` (one, or an ensemble's, its first the study's winner) with test-time `tta`:
    each prepared as one retrain is, the first carrying the run and the others riding along, every one checked
    before anything is written."""
    first = prepare_final(request, members[0])
    if len(members) == 1 and not tta:
        return first
    return replace(first, more_members=tuple(prepare_final(request, member) for member in members[1:]), tta=tta)


def prepare_final(request: RetrainRequest, config: Winner, split_of: Winner | None = None) -> PreparedFinal:
    """Everything that can fail on bad input, checked before anything is written. The split is the study's own:
    that of the study `config` comes from, or of `split_of`'s (compare.py's reference model, tested on the studies'
    test images), as its split.json recorded it (study_split)."""
    hp = config.hyperparameters
    data = request.data or config.split.data
    try:
        # The study's seed, whatever --seed says: for a study without a split record, the split is cut again.
        current = index_source(data, config.split.seed, subgroups=config.subgroups, window=config.window)
    except DataError as error:
        raise UsageError(str(error)) from None
    if current.classes != config.classes:
        raise UsageError(class_mismatch(current.source, current.classes, config))
    positive = positive_index(request.positive, config.classes)
    external = None  # --external's images: refused now (a missing folder, a class the model lacks), not after training
    if request.external is not None:
        external = prepare_external(
            request.external,
            config.classes,
            config.img_size,
            request.cache_dir,
            subgroups=config.subgroups,
            window=config.window,
        )
    record, unchecked = study_split_record(request.tracking_uri, split_of or config)
    index = retrain_index(current, config.split, record, unchecked)

    weights = request.weights
    spec = ModelSpec(
        config.model,
        len(config.classes),
        config.img_size,
        pretrained=config.pretrained and not request.no_pretrained,
        weights_files=weights,
        backbone=config.backbone,
    ).with_knobs(hp)
    try:
        validate_spec(spec)
    except ValueError as error:
        raise UsageError(f"{config.source}: {error}") from None
    if spec.pretrained:
        require_pretrained(backbones_of(spec), weights)

    epochs: int | None
    if request.keep_val:  # early stopping decides: give it the study's budget
        epochs = request.epochs or config.epochs or FULL.epochs
    else:  # no val split to stop on: as many epochs as the winner needed
        epochs = request.epochs or config.best_epoch
    if epochs is None:
        raise UsageError(
            f"{config.source} does not say how many epochs the winner trained (best_epoch): pass --epochs N"
        )

    splits = ("train", "val", "test") if request.keep_val else ("trainval", "test")
    index = replace(index, splits={**index.splits, "trainval": index.splits["train"] + index.splits["val"]})
    try:
        index, cached, skipped = prepare_splits(index, splits, config.img_size, Path(request.cache_dir).resolve())
    except DataError as error:
        raise UsageError(str(error)) from None
    if request.operating_point is not None:
        check_operating_point(request, positive, config.classes, cached.get("val"))

    label = final_label(config, request.config_file)
    seed = config.split.seed if request.seed is None else request.seed
    settings = RetrainSettings(
        model=config.model,
        source=config.source,
        study=config.study,
        trial=config.trial,
        trial_id=config.trial_id,
        train_on="train" if request.keep_val else "train+val",
        epochs=epochs,
        img_size=config.img_size,
        seed=seed,
        split_seed=config.split.seed,
        split_from="study_record" if record is not None else "seed",  # the study's split.json, or cut again
        data=index.source,
        window=index.window,
        smoke=config.split.smoke,
        pretrained=spec.pretrained,
        search_metric=config.metric,
        search_best_value=config.best_value,
        num_classes=len(index.classes),
        train_images=len(cached[splits[0]]),
        val_images=len(cached["val"]) if request.keep_val else 0,
        test_images=len(cached["test"]),
        # The temperature is fitted on val only if the model never trained on it; the test is never fitted on.
        calibration_split=CALIBRATION_SPLIT if request.keep_val else "none",
    )
    return PreparedFinal(
        config=config,
        spec=spec,
        index=index,
        train=cached[splits[0]],
        val=cached.get("val"),
        test=cached["test"],
        epochs=epochs,
        seed=seed,
        tracking_uri=request.tracking_uri,
        experiment=request.experiment,
        register_name=None if config.model == REFERENCE else request.register_name or f"{config.model}-classifier",
        out=Path(request.out or f"final/{label}-{datetime.now():%Y%m%d-%H%M%S}"),
        label=label,
        settings=settings,
        skipped_images=skipped,
        export=request.export,
        positive=positive,
        operating_point=request.operating_point,
        external=external,
    )


def positive_index(positive: str | None, classes: list[str]) -> int | None:
    """--positive CLASS as its index in the winner's classes; None where none was named."""
    if positive is None:
        return None
    if positive not in classes:
        shown = ", ".join(classes[:20]) + (" ..." if len(classes) > 20 else "")
        raise UsageError(f"--positive {positive}: not a class of the model; its classes are {shown}")
    return classes.index(positive)


def check_operating_point(
    request: RetrainRequest, positive: int | None, classes: list[str], val: CachedSplit | None
) -> None:
    """Before training: an operating point needs a positive class and a val split the model does not train on
    that holds the images its target counts (positives for a sensitivity, others for a specificity)."""
    target = request.operating_point
    if target is None:
        return
    if positive is None:
        raise UsageError(f"--operating-point {target} needs --positive CLASS: the class the threshold flags")
    if not request.keep_val or val is None:
        raise UsageError(f"--operating-point {target} needs --keep-val: the threshold is chosen on val")
    counted = int((val.labels == positive).sum())
    if target.target == "specificity":
        counted = len(val.labels) - counted
    if counted == 0:
        whose = f"of class {classes[positive]}" if target.target == "sensitivity" else f"outside {classes[positive]}"
        raise UsageError(
            f"--operating-point {target}: the val split has no image {whose} to choose the threshold on; "
            f"use more data or another --positive"
        )


def final_label(config: Winner, config_file: str | None) -> str:
    """Names the run and the results folder: the study, the config file, the trial run or the reference."""
    if config.model == REFERENCE:
        return f"reference-{config.backbone}"
    return config.study or (Path(config_file).stem if config_file else f"run-{config.run_id}")


def class_mismatch(source: str, classes: list[str], config: Winner) -> str:
    missing = [c for c in config.classes if c not in classes]
    extra = [c for c in classes if c not in config.classes]
    if missing or extra:
        detail = "; ".join(
            part
            for part in (
                f"missing {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}" if missing else "",
                f"not in the study: {', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}" if extra else "",
            )
            if part
        )
    else:
        detail = "the same names in another order"
    return (
        f"data source {source} has other classes than {config.source} ({detail}): the model's outputs would mean "
        f"other things; retrain on the study's data ({config.split.data}) or on data with the same class folders"
    )


# ---------------------------------------------------------------- execute


def execute_final(final: PreparedFinal) -> int:
    config = final.config
    client = mlflow_client(final.tracking_uri)
    experiment_id, run_id = open_final_run(client, final)
    log_params(client, run_id, {**final.settings.to_dict(), **config.hyperparameters.to_dict()})
    if final.operating_point is not None:
        log_params(client, run_id, operating_point_params(final))
    log_data_input(client, run_id, data_record(final.index), context="train and test")
    if final.skipped_images:
        print(
            f"warning: skipped {len(final.skipped_images)} unreadable image(s), "
            f"e.g. {', '.join(final.skipped_images[:3])}"
        )
    print(f"{describe(final)}{' Smoke config: the study subsample.' if config.split.smoke else ''}", flush=True)

    def log_epoch(result: EpochResult) -> None:
        stamp = int(datetime.now().timestamp() * 1000)
        client.log_batch(run_id, metrics=[Metric(k, float(v), stamp, result.epoch) for k, v in result.metrics.items()])

    status = "FAILED"
    shipped = None
    try:
        if final.averaged:  # --ensemble, --tta: every member trained as one model is, then averaged
            learner, trained_epochs, result, val, shipped = test_ensemble(final, client, run_id, log_epoch)
        else:
            learner, trained_epochs = train_member(final, log_epoch)
            val = None if final.val is None else predict(final, learner, final.val, "val")
            result = evaluate_once(final, learner, val)
        operating = choose_operating_point(final, result, val)
        external = test_external(final, learner, result, operating)
        registered, export_failure = finish(
            final, client, run_id, learner, result, trained_epochs, operating, external, shipped
        )
        status = "FINISHED"  # with or without --export's file: the retrain and its registered model are whole
    except KeyboardInterrupt:
        status = "KILLED"
        print(f"\nstopped: final retrain of {final.label} interrupted")
        return 130
    except NonFiniteLoss as error:
        print(f"search/final.py: training diverged: {error}", file=sys.stderr)
        return 1
    finally:
        client.set_terminated(run_id, status)
    print_closing(final, result, registered, experiment_id, run_id, export_failure, operating, external, shipped)
    return EXPORT_FAILED if export_failure else 0


def open_final_run(client, final: PreparedFinal) -> tuple[str, str]:
    """A top-level run beside the study's (same experiment), tagged with the study and role=final."""
    config = final.config
    if config.experiment_id and not final.experiment:
        experiment_id = config.experiment_id
    else:
        experiment_id = get_or_create_experiment(client, final.experiment or config.model, final.tracking_uri)
    tags = {
        ROLE_TAG: FINAL_ROLE,
        "model": config.model,
        "source_run_id": config.run_id or "",
        "best_trial": config.trial or "",  # t07, as the study named it; Ray's id beside it
        "best_trial_id": config.trial_id or "",
        "mlflow.note.content": describe(final),
    }
    if config.study:
        tags[STUDY_TAG] = config.study
    tags.update(final.tags)
    run = client.create_run(experiment_id, run_name=f"{final.label}-final", tags=tags)
    return experiment_id, run.info.run_id


def describe(final: PreparedFinal) -> str:
    """The run's description in the MLflow UI, and final.py's first line: the trial by its name (t07)."""
    config = final.config
    trial = f" (trial {config.trial_name})" if config.trial_name else ""
    return (
        f"Final retrain of {config.source}{trial}: {config.backbone or config.model} on "
        f"{final.settings.train_on} ({len(final.train)} images) for {final.epochs} epoch(s), "
        f"tested once on {len(final.test)} held-out images.{averaging(final)}"
    )


def averaging(final: PreparedFinal) -> str:
    """' An ensemble of 3 (t07, t03, t05), each trained so; test-time hflip.', or '' for one model."""
    parts = []
    if final.more_members:
        labels = ", ".join(member_label(member, rank) for rank, member in enumerate(final.members, start=1))
        parts.append(f"An ensemble of {len(final.members)} ({labels}), each trained so")
    if final.tta:
        parts.append(f"test-time {', '.join(final.tta)}")
    return f" {'; '.join(parts)}." if parts else ""


def train_member(final: PreparedFinal, on_epoch: Callable[[EpochResult], None]) -> tuple[Learner, int]:
    """One network trained (train), saying which epoch early stopping kept."""
    learner, trained_epochs = train(final, on_epoch)
    if final.val is not None:
        print(
            f"Early stopping on {final.config.metric}: testing the weights of epoch {trained_epochs} of {learner.epoch}"
        )
    return learner, trained_epochs


def test_ensemble(
    final: PreparedFinal, client, run_id: str, log_epoch: Callable[[EpochResult], None]
) -> tuple[Learner, int, HeldOutResult, LabelledLogits | None, Shipped]:
    """--ensemble and --tta: each member trained and calibrated as final.py trains and calibrates one model (its
    epochs logged with a member_<label>_ prefix, the first's as a single model's), its logits of the test (and val)
    images and their flips kept; then the averaged probabilities tested once, and judged against the first member
    alone and against no flips. With --keep-val each average's T_ens is fitted on val's averaged log-probabilities
    (never the test's). The first member's learner and trained epochs, the result, val's averaged probabilities as
    log-probabilities (for the operating point, at the result's temperature T_ens), what is shipped."""
    members = final.members
    trained: list[TrainedMember] = []
    for rank, member in enumerate(members, start=1):
        label = member_label(member, rank)
        if len(members) > 1:
            print(f"Member {rank}/{len(members)}: {label} ({member.epochs} epoch(s))", flush=True)
        on_epoch = log_epoch if rank == 1 else prefixed_logger(client, run_id, f"member_{label}_")
        learner, trained_epochs = train_member(member, on_epoch)
        trained.append(tested_member(member, label, learner, trained_epochs, final.tta))
        if rank == 1:
            first, first_epochs = learner, trained_epochs  # kept for finish; the others' weights are in `trained`
        else:
            del learner  # its weights are copied: free the rest before the next member trains
    views, classes, labels = 1 + len(final.tta), final.config.classes, final.test.labels
    logits = [member.test for member in trained]
    calibrations = [member.calibration for member in trained]
    val_logits = members_val(trained, final)
    result = averaged_result(logits, calibrations, views, labels, classes, val_logits)
    alone = [averaged_result([m.test], [m.calibration], views, labels, classes, own_val(m, final)) for m in trained]
    keys = [sample.key for sample in final.index.splits["test"]]  # the cached split's order: the results' rows
    subject = f"The ensemble of {len(trained)}" if len(trained) > 1 else trained[0].label
    outcome = Outcome(
        members=tuple(
            member_score(
                m.label,
                rank,
                m.prepared.config.best_value,
                own,
                m.calibration,
                m.prepared.epochs,
                m.trained_epochs,
                m.prepared.config.hyperparameters.to_dict(),
            )
            for rank, (m, own) in enumerate(zip(trained, alone, strict=True), start=1)
        ),
        flips=final.tta,
        metric=final.config.metric,
        test_acc=result.intervals["test_acc"],
        vs_best_member=(
            judge(subject, f"{trained[0].label} alone", result, alone[0], keys, classes) if len(trained) > 1 else None
        ),
        vs_without_tta=(
            judge(
                f"{subject} with test-time {', '.join(final.tta)}",
                "without",
                result,
                averaged_result(logits, calibrations, 1, labels, classes, val_logits),
                keys,
                classes,
            )
            if final.tta
            else None
        ),
    )
    val = None
    if final.val is not None:
        averaged_val = averaged_probabilities([m.val for m in trained], [c.temperature for c in calibrations])
        val = (log_probabilities(averaged_val), final.val.labels)  # at the result's temperature: T_ens
    networks = tuple(
        Member(
            m.weights,
            m.prepared.spec,
            m.prepared.config.hyperparameters,
            m.calibration.temperature,
            own.metrics,
            m.label,
        )
        for m, own in zip(trained, alone, strict=True)
    )
    result = with_subgroups(result, subgroup_values(final), final.positive, classes)
    shipped = Shipped(networks, outcome, result.calibration.temperature)
    return first, first_epochs, result, val, shipped


def members_val(trained: list[TrainedMember], final: PreparedFinal) -> tuple[list[np.ndarray], np.ndarray] | None:
    """Each member's val logits of each view, with val's labels: where the average's T_ens is fitted; None without
    --keep-val."""
    logits = [member.val for member in trained if member.val is not None]
    if final.val is None or len(logits) != len(trained):
        return None
    return logits, final.val.labels


def own_val(member: TrainedMember, final: PreparedFinal) -> tuple[list[np.ndarray], np.ndarray] | None:
    """A member's val logits of each view, with val's labels, for its own average over the flips; None without
    --keep-val."""
    return members_val([member], final)


@dataclass(frozen=True)
class TrainedMember:
    """One member after training: its weights (on the CPU), its logits of each view, its temperature."""

    prepared: PreparedFinal
    label: str
    weights: dict
    trained_epochs: int
    test: np.ndarray
    """(views, N, C) test logits: the image, then each flip."""
    val: np.ndarray | None
    """(views, N, C) val logits, where the member early-stopped on val (--keep-val); else None."""
    calibration: Calibration
    """Its temperature, fitted on its val logits of the images themselves (--keep-val), else 1."""


def tested_member(
    member: PreparedFinal, label: str, learner: Learner, trained_epochs: int, flips: tuple[str, ...]
) -> TrainedMember:
    """A trained member's logits of the test (and val) images and their flips, and its temperature."""
    test = view_logits(member, learner, member.test, "test", flips)
    val = None if member.val is None else view_logits(member, learner, member.val, "val", flips)
    calibration = member_calibration(
        None if val is None else val[0], None if member.val is None else member.val.labels, test[0], member.test.labels
    )
    model = learner.model.to("cpu").to(memory_format=torch.contiguous_format).eval()
    weights = {key: value.detach().clone() for key, value in model.state_dict().items()}
    return TrainedMember(member, label, weights, trained_epochs, test, val, calibration)


def view_logits(
    final: PreparedFinal, learner: Learner, split: CachedSplit, name: str, flips: tuple[str, ...]
) -> np.ndarray:
    """(views, N, C) logits of the split's images, then of each flip of them (flipped as the scoring network
    flips its input)."""
    views = [predict(final, learner, split, name)[0]]
    for flip in flips:
        flipped = replace(split, loaded_images=flipped_images(split.images(), flip))
        views.append(predict(final, learner, flipped, f"{name} {flip}")[0])
    return np.stack(views)


def member_label(member: PreparedFinal, rank: int) -> str:
    """A member's name in reports: its trial's (t07), else its rank (m2)."""
    return member.config.trial_name or f"m{rank}"


def prefixed_logger(client, run_id: str, prefix: str) -> Callable[[EpochResult], None]:
    """An ensemble member's epochs on the final run, each metric prefixed (member_t03_val_acc), step = epoch."""

    def log_epoch(result: EpochResult) -> None:
        stamp = int(datetime.now().timestamp() * 1000)
        client.log_batch(
            run_id, metrics=[Metric(prefix + k, float(v), stamp, result.epoch) for k, v in result.metrics.items()]
        )

    return log_epoch


def train(final: PreparedFinal, on_epoch: Callable[[EpochResult], None]) -> tuple[Learner, int]:
    """Train through `fit`, handing every epoch to on_epoch; with a val split, keep the best epoch's weights."""
    hp = final.config.hyperparameters
    torch.manual_seed(final.seed)  # as a trial does: the same seed gives the same initial head
    monitor = final.config.metric if final.val is not None else "train_loss"
    learner = Learner(build_model(final.spec), hp, select_device(), monitor, final.seed)

    per_epoch = epoch_batches(len(final.train), len(final.val) if final.val is not None else None, hp.batch_size)
    bars = bars_wanted()
    epochs_bar = tqdm(
        total=final.epochs, desc="retrain", unit="epoch", position=0, dynamic_ncols=True, disable=not bars
    )
    batches_bar = tqdm(
        total=per_epoch, desc="epoch 1", unit="batch", position=1, leave=False, dynamic_ncols=True, disable=not bars
    )
    best_state, best_epoch = None, 0
    started = time.perf_counter()
    try:
        for result in fit(learner, final.train, final.val, final.epochs, on_batch=batches_bar.update):
            on_epoch(result)
            if final.val is not None and result.improved:
                best_state, best_epoch = copy.deepcopy(learner.model.state_dict()), result.epoch
            shown = {k: v for k, v in result.metrics.items() if k in ("train_loss", monitor)}
            if bars:
                epochs_bar.set_postfix({k: f"{v:.4f}" for k, v in shown.items()})
                epochs_bar.update()
            else:
                print(epoch_line(result.epoch, final.epochs, shown, time.perf_counter() - started), flush=True)
            started = time.perf_counter()
            if not result.finished:
                batches_bar.reset()
                batches_bar.set_description(f"epoch {result.epoch + 1}")
    finally:
        batches_bar.close()
        epochs_bar.close()
    if best_state is not None:
        learner.model.load_state_dict(best_state)  # early stopping on val: test the best epoch, not the last
        return learner, best_epoch
    return learner, learner.epoch


def epoch_line(epoch: int, epochs: int, metrics: dict[str, float], seconds: float) -> str:
    """'epoch 3/10  train_loss 0.4312  val_acc 0.8123  (12.4 s)'."""
    scores = "  ".join(f"{key} {value:.4f}" for key, value in metrics.items())
    return f"epoch {epoch}/{epochs}  {scores}  ({seconds:.1f} s)"


def evaluate_once(final: PreparedFinal, learner: Learner, val: LabelledLogits | None = None) -> HeldOutResult:
    """The one look at the test split; with a val split the model did not train on (--keep-val), the
    temperature is fitted on val's logits (`val`, where already predicted), never on the test's."""
    if val is None and final.val is not None:
        val = predict(final, learner, final.val, "val")
    logits, labels = predict(final, learner, final.test, "test")
    result = evaluate_test(logits, labels, final.config.classes, val=val)
    return with_subgroups(result, subgroup_values(final), final.positive, final.config.classes)


def subgroup_values(final: PreparedFinal) -> dict[str, list[str]]:
    """Each subgroup column the study declared -> its value per test image, in the test split's (the result's)
    order; {} for a study without subgroups."""
    tested = final.index.splits["test"]
    return {column: [sample.attribute(column) for sample in tested] for column in final.config.subgroups}


def operating_point_params(final: PreparedFinal) -> dict[str, str]:
    """--operating-point and --positive as the final run's params (for people and the UI)."""
    target, positive = final.operating_point, final.positive
    assert target is not None and positive is not None  # prepare_final checked
    return {
        "op_positive": final.config.classes[positive],
        "op_target": target.target,
        "op_target_value": f"{target.value:g}",
    }


def choose_operating_point(
    final: PreparedFinal, result: HeldOutResult, val: LabelledLogits | None
) -> OperatingPoint | None:
    """--operating-point's threshold, chosen on val's calibrated probabilities (never the test's), then measured
    on the test with the intervals' resamples and seed; None without the flag."""
    target = final.operating_point
    if target is None:
        return None
    assert val is not None and final.positive is not None  # prepare_final checked: --keep-val, --positive
    val_logits, val_labels = val
    return operating_point(
        final.config.classes,
        final.positive,
        target.target,
        target.value,
        val=(softmax(val_logits, result.calibration.temperature), val_labels),
        test=(result.probabilities, result.labels),
        seed=INTERVAL_SEED,
    )


def test_external(
    final: PreparedFinal, learner: Learner, result: HeldOutResult, operating: OperatingPoint | None
) -> ExternalResult | None:
    """--external's images scored as the test split, at the temperature fitted on val (never on them), with the
    operating point and the subgroups where they ran; None without --external."""
    if final.external is None:
        return None
    logits, labels = predict(final, learner, final.external.images, "external")
    return evaluate_external(
        final.external,
        logits,
        labels,
        result.calibration.temperature,
        internal=result,
        positive=final.positive,
        operating_point=operating.model_record() if operating is not None else None,
    )


def predict(final: PreparedFinal, learner: Learner, split: CachedSplit, name: str) -> LabelledLogits:
    """The split's logits and labels, with a progress bar in a terminal."""
    batch_size = EVAL_BATCH_FACTOR * final.config.hyperparameters.batch_size
    bar = tqdm(
        total=batch_count(len(split), batch_size),
        desc=name,
        unit="batch",
        leave=False,
        dynamic_ncols=True,
        disable=not bars_wanted(),
    )
    try:
        logits, labels = learner.predict(split, on_batch=bar.update)
    finally:
        bar.close()
    return logits.numpy(), labels


def finish(
    final: PreparedFinal,
    client,
    run_id: str,
    learner: Learner,
    result: HeldOutResult,
    trained_epochs: int,
    operating: OperatingPoint | None = None,
    external: ExternalResult | None = None,
    shipped: Shipped | None = None,
) -> tuple[Registration | None, str | None]:
    """Write the results folder, log it and the test metrics, log and register the model, give it its model
    card; then --export's file. (The registered version, or None; why the export failed, or None.) `shipped`:
    --ensemble's members and --tta's flips, and what they are worth, written into the model file and reported."""
    model = learner.model.to("cpu").to(memory_format=torch.contiguous_format).eval()
    write_results(final, model, result, operating, shipped)
    stamp = int(datetime.now().timestamp() * 1000)
    scores = {**logged_metrics(result), "trained_epochs": trained_epochs}
    if operating is not None:
        scores.update(operating.metrics())
    if shipped is not None:
        scores.update(shipped.outcome.metrics())
        log_params(client, run_id, shipped_params(shipped.outcome))
        if shipped.outcome.ensemble:
            client.log_table(run_id, data=shipped.outcome.table(), artifact_file=MEMBERS_TABLE)
    client.log_batch(run_id, metrics=[Metric(k, float(v), stamp, 0) for k, v in scores.items() if v == v])  # no NaN
    client.log_table(run_id, data=per_class_table(result), artifact_file=PER_CLASS_TABLE)
    if external is not None:
        log_external(client, run_id, external, final.out)
    if result.subgroups is not None:
        client.log_table(run_id, data=table_columns(result.subgroups), artifact_file=SUBGROUP_TABLE)
    for name in RESULT_FILES:
        client.log_artifact(run_id, str(final.out / name))
    registered = None
    if final.register_name is not None:
        registered = log_model(final.out / FINAL_MODEL_FILE, final.tracking_uri, run_id, final.register_name)
        client.set_tag(run_id, "registered_model", registered.tag)
    metrics_file = final.out / METRICS_FILE
    metrics_file.write_text(
        json.dumps(
            {
                **held_out_record(result),
                "trained_epochs": trained_epochs,
                **({"operating_point": operating.record()} if operating is not None else {}),
                **({"external": external.record()} if external is not None else {}),
                **(shipped.outcome.record() if shipped is not None else {}),
                "settings": final.settings.to_dict(),
                "mlflow": {
                    "tracking_uri": final.tracking_uri,
                    "run_id": run_id,
                    **(registered.to_dict() if registered else {}),
                },
            },
            indent=2,
        )
    )
    client.log_artifact(run_id, str(metrics_file))
    outcome = shipped.outcome if shipped is not None else None
    facts = publish_card(final, client, run_id, result, trained_epochs, registered, operating, external, outcome)
    publish_checklist(final, client, run_id, facts, registered)  # after metrics.json's last key: it renders the file
    # Last: the registered model stands on its own, and an export that fails must not take the retrain with it.
    return registered, export_model(final, client, run_id)


def export_model(final: PreparedFinal, client, run_id: str) -> str | None:
    """--export's file (of the model file's scoring network: its members and flips in one graph) written,
    checked against PyTorch and logged; None when done or not asked for. Where the check or the exporter fails:
    no file left, a warning line, the run tagged, and why returned."""
    if final.export != "onnx":
        return None
    path = final.out / ONNX_FILE
    try:
        scoring = scoring_network(ModelFile.load(final.out / FINAL_MODEL_FILE))
        check = export_onnx(scoring, final.test.images(), path)
    except ExportMismatch as error:
        failure = str(error)
    except Exception as error:  # the exporter's or ONNX Runtime's own failure (an operator it cannot convert)
        failure = f"the exporter failed ({type(error).__name__}: {one_line(error)})"
    except BaseException:  # Ctrl-C: no half-written file either
        path.unlink(missing_ok=True)
        raise
    else:
        client.log_artifact(run_id, str(path))
        print(check.line(), flush=True)
        return None
    path.unlink(missing_ok=True)
    client.set_tag(run_id, EXPORT_FAILED_TAG, failure)  # one line: short of MLflow's 8000 characters
    print(
        f"warning: --export {final.export} failed, {ONNX_FILE} left out: {failure}; the registered model, "
        f"{FINAL_MODEL_FILE} and the results are complete",
        flush=True,
    )
    return failure


def publish_card(
    final: PreparedFinal,
    client,
    run_id: str,
    result: HeldOutResult,
    trained_epochs: int,
    registered: Registration | None,
    operating: OperatingPoint | None = None,
    external: ExternalResult | None = None,
    ensemble: Outcome | None = None,
) -> CardFacts:
    """model_card.md in the results folder and on the run; on a registered version, the card (cut to the
    registry's limit) as its description, and its tags. The card's facts, for the checklist."""
    facts = card_facts(final, result, trained_epochs, registered, run_id, operating, external, ensemble)
    card_file = final.out / MODEL_CARD_FILE
    card_file.write_text(card_markdown(facts))
    client.log_artifact(run_id, str(card_file))
    if registered is not None:
        describe_version(client, registered, card_markdown(facts, DESCRIPTION_LIMIT), card_tags(facts))
    return facts


def publish_checklist(
    final: PreparedFinal, client, run_id: str, facts: CardFacts, registered: Registration | None
) -> None:
    """checklist.md, rendered from the card's facts, metrics.json as written and the study's leakage check: in the
    results folder and on the run; on a registered version, among its model's files (models:/NAME/VERSION/
    checklist.md) and summed up in its 'checklist' tag."""
    record = json.loads((final.out / METRICS_FILE).read_text())  # the record that was written is the one read
    leaks = study_leaks(final.tracking_uri, final.config)
    path = final.out / CHECKLIST_FILE
    path.write_text(checklist_markdown(facts, record, leaks))
    client.log_artifact(run_id, str(path))
    if registered is not None:
        attach_checklist(client, registered, path, checklist_tag(facts, record, leaks))


def write_results(
    final: PreparedFinal,
    model: nn.Module,
    result: HeldOutResult,
    operating: OperatingPoint | None = None,
    shipped: Shipped | None = None,
) -> None:
    """Weights, config, class names, split and the test's plots: everything to use or repeat the model (and
    the operating point's threshold, which predict.py applies; an ensemble's members and the flips of --tta,
    which the registered model, the export and predict.py average)."""
    config, out = final.config, final.out
    out.mkdir(parents=True, exist_ok=True)
    threshold = operating.model_record() if operating is not None else None
    window = final.index.window  # predict.py decodes DICOM images as this training did
    if shipped is not None:  # each member with its own temperature; the file's scores are the ensemble's
        model_file = ModelFile.from_members(
            shipped.members,
            config.classes,
            result.metrics,
            tta=final.tta,
            operating_point=threshold,
            window=window,
            ensemble_temperature=shipped.ensemble_temperature,
        )
    else:
        model_file = ModelFile(
            model.state_dict(),
            final.spec,
            config.hyperparameters,
            config.classes,
            result.metrics,
            temperature=result.calibration.temperature,
            operating_point=threshold,
            window=window,
        )
    model_file.save(out / FINAL_MODEL_FILE)
    (out / "config.yaml").write_text(config.to_yaml())  # the winner's record: final.py --config repeats the run
    (out / "classes.json").write_text(json.dumps(config.classes, indent=2))
    index = final.index
    (out / "splits.json").write_text(
        json.dumps(
            {
                "source": index.source,
                "seed": config.split.seed,
                "smoke": config.split.smoke,
                **{split: [s.key for s in index.splits[split]] for split in ("train", "val", "test")},
            },
            indent=1,
        )
    )
    (out / "classification_report.txt").write_text(result.report)
    test_keys = [sample.key for sample in index.splits["test"]]  # the cached split's order: the result's rows
    (out / PREDICTIONS_FILE).write_text(
        predictions_csv(Predictions(test_keys, result.labels, result.probabilities, config.classes))
    )
    plot_confusion(
        result,
        config.classes,
        out / "confusion_matrix.png",
        f"{config.model}: test confusion matrix ({len(result.labels)} images)",
    )
    plot_reliability(
        result.calibration,
        out / "reliability_diagram.png",
        f"{config.model}: test reliability ({len(result.labels)} images)",
    )


def print_closing(
    final: PreparedFinal,
    result: HeldOutResult,
    registered: Registration | None,
    experiment_id: str,
    run_id: str,
    export_failure: str | None = None,
    operating: OperatingPoint | None = None,
    external: ExternalResult | None = None,
    shipped: Shipped | None = None,
) -> None:
    print()
    for line in summary_lines(result, final.config.metric, final.config.best_value, len(final.test)):
        print(line)
    for line in shipped.outcome.lines() if shipped is not None else []:
        print(line)
    for line in operating.lines() if operating is not None else []:
        print(line)
    for line in external_lines(external) if external is not None else []:
        print(line)
    if registered:
        uri = registered.version_uri
        print(
            f"Model:      registered as {registered.name} version {registered.version} "
            f"(mlflow.pytorch.load_model({uri!r}): float32 images (N, 3, H, W) in [0, 1] -> class probabilities)"
        )
    if final.export == "onnx" and export_failure:
        print(
            f"ONNX:       not written: the export failed (the warning above says why; exit status {EXPORT_FAILED}); "
            f"everything else is complete"
        )
    elif final.export == "onnx":
        print(
            f"ONNX:       {final.out / ONNX_FILE} (onnxruntime: float32 images (N, 3, H, W) in [0, 1] -> class "
            f"probabilities, as the registered model)"
        )
    print(
        f"Results:    {final.out}/ (model.pt, {MODEL_CARD_FILE}, {CHECKLIST_FILE}, config.yaml, metrics.json, "
        f"confusion_matrix.png, ...)"
    )
    print("\n".join(mlflow_lines(final.tracking_uri, run_page(final.tracking_uri, experiment_id, run_id))))
