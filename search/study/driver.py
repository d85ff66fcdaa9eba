"""From a checked configuration to a finished study: prepare (weights, store, cache, Ray, GPU share), then execute.

`prepare_study` does what can still fail on bad input (pretrained weights, the store,
the data's images, GPU memory) before anything is written to MLflow, and starts Ray (a
private one, or joins the cluster at --address). `execute_study` opens the study's parent
run, runs Ray Tune, and exports the winner. The GPU share comes from search.study.resources.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import ray
import torch
from mlflow.tracking import MlflowClient
from ray import tune
from ray._private import ray_constants
from ray.exceptions import AuthenticationError
from ray.tune import Checkpoint, ResultGrid

from search.cli import interrupts_ignored, require_pretrained
from search.errors import UsageError, one_line
from search.records.location import is_uri, join
from search.records.study_config import CONFIG_FILE, ConfigError, StudyConfig
from search.records.winner import Winner
from search.study.cluster import ClusterWatch, token_refused
from search.study.confirm import (
    Confirmed,
    Retrain,
    candidates,
    confirm_run,
    confirm_table,
    confirmed_scores,
    confirmed_what,
    confirmed_winner,
    log_confirmation,
    plan_retrains,
    retrained_trial,
)
from search.study.console import print_closing, print_resume_hint
from search.study.leaks import LeakReport, check_leaks, training_flips
from search.study.preflight import CheckedStudy
from search.study.report import StudySummary, trial_order
from search.study.resources import (
    GpuShare,
    cluster_gpu_share,
    given_gpu_share,
    local_resources,
    measured_gpu_share,
    start_gpu_probe,
)
from search.study.resume import TUNER_STATE
from search.study.run_report import log_study_report
from search.study.spaces import Space
from search.study.storage import exists, staged, write_text
from search.study.tuning import (
    make_confirm_tuner,
    make_tuner,
    restore_tuner,
    smaller_sizes,
    trial_setup,
    unfinished_trials,
)
from search.tracking.optuna_store import fail_orphans, load_study
from search.tracking.schema import (
    BEST_CONFIG_FILE,
    BEST_DIR,
    BEST_MODEL_FILE,
    CONFIRM_ROLE,
    ELAPSED_METRIC,
    EXTENDED_TAG,
    PARENT_TAG,
    ROLE_TAG,
    TRIAL_ID_TAG,
    TRIAL_LABEL_TAG,
    TrialNames,
)
from search.tracking.store import close_open_children, mlflow_client
from search.tracking.study_run import (
    claim_optuna_study,
    data_record,
    drop_optuna_study,
    has_best_config,
    log_best,
    open_parent_run,
    open_stores,
    read_best_config,
    reopen_parent_run,
)
from search.tracking.trials import MlflowTrials
from trainables.checkpoint import ModelFile, load_trial_checkpoint
from trainables.config import improves
from trainables.data import (
    CachedSplit,
    DataError,
    DatasetIndex,
    cache_resized,
    existing_ancestor,
    megabytes,
    prepare_splits,
)
from trainables.spec import BACKBONES, ModelSpec
from trainables.trainable import TrialSetup

LOOPBACK_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
"""Ray's switch for a machine-local Ray (its default on Windows and macOS). Set to 0, Ray takes 127.0.0.1 as
the node's address, so its gRPC servers and agents listen on loopback instead of on every interface.
Ray's worker processes read it from the environment; this process's Ray, imported already, is told directly."""
TUNE_LOGGER = "ray.tune"
TUNE_LOGGERS_KEPT = ("ray.tune.execution.insufficient_resources_manager",)
"""Tune's loggers heard without --verbose: trials that wait for resources (start_ray's quiet_tune_logs)."""
FULL_DISK_BYTES = 16 * 2**20
"""Less free space than this under --storage-path explains a failure: a trial's checkpoint is larger."""


@dataclass(frozen=True, kw_only=True)
class PreparedStudy:
    """A study ready to run: its configuration (GPU share resolved) and what the checks and the cache produced."""

    config: StudyConfig
    space: Space
    index: DatasetIndex
    """The data index, without the images that would not decode."""
    spec: ModelSpec
    train: CachedSplit
    val: CachedSplit
    resized: dict[int, tuple[CachedSplit, CachedSplit]] = field(default_factory=dict)
    """(train, val) at each smaller size of a resolution schedule (search.study.tuning.epoch_sizes); empty without."""
    skipped_images: list[str]
    leaks: LeakReport
    """Duplicate images across train, val and test, found before training."""
    resume_run_id: str | None = None
    warm_start: tuple[dict, ...] = ()
    """Configurations the search tries first (--warm-start)."""
    address: str | None = None
    """The Ray cluster joined (None: a private local Ray)."""


def run_study(config: StudyConfig, checked: CheckedStudy, verbose: bool = False, address: str | None = None) -> int:
    """verbose: Ray's own output (its progress reports, the trial processes' output) besides the study's lines;
    address: a running Ray cluster to join (None: a private local Ray)."""
    started = time.monotonic()  # the study's time includes caching the data and starting Ray
    return execute_study(prepare_study(config, checked, verbose, address), started, verbose)


# ---------------------------------------------------------------- prepare


def prepare_study(
    config: StudyConfig, checked: CheckedStudy, verbose: bool = False, address: str | None = None
) -> PreparedStudy:
    """Check and cache everything the study needs, and start Ray.

    Returns with Ray running; on any error Ray is stopped again and nothing was written.
    """
    # --gpus-per-trial auto on this machine's GPU: the probe, in a process of its own, overlaps what follows.
    gpu_probe = start_gpu_probe(config, checked) if address is None else None
    # Checked at once on this machine; on a cluster once joined, from the cluster's resources.
    share = given_gpu_share(config, *local_resources()) if gpu_probe is None and address is None else None
    if share is not None:
        resolved_config(config, share)  # what the share rules out is refused before anything is written
    try:
        if config.pretrained:
            require_pretrained(BACKBONES[config.model], config.weights)
        open_stores(config, checked.resume_run_id)
        index, splits, skipped = cache_data(config, checked.index)
        resized = cache_smaller(config, index)
        # --on-leak fail stops here: no run opened, no Ray started
        flips = training_flips(checked.space)  # mirrored copies the augmentation would train on
        leaks = check_leaks(index, splits, config.img_size, config.cache_dir, config.on_leak, flips)
        train, val = splits["train"], splits["val"]
        start_ray(verbose, address)
        if address is not None:
            share = cluster_gpu_share(config, checked)
            train, val, resized = shipped_to_cluster(train, val, resized)
            note_storage_on_cluster(config.storage_path)
        elif share is None:
            share = measured_gpu_share(config, gpu_probe, max(1, torch.cuda.device_count()))
        resolved = resolved_config(config, share)
        return PreparedStudy(
            config=resolved,
            space=checked.space,
            index=index,
            spec=checked.spec,
            train=train,
            val=val,
            resized=resized,
            skipped_images=skipped,
            leaks=leaks,
            resume_run_id=checked.resume_run_id,
            warm_start=checked.warm_start,
            address=address,
        )
    except BaseException:
        if gpu_probe is not None:
            gpu_probe.cancel()
        ray.shutdown()
        raise


def resolved_config(config: StudyConfig, share: GpuShare) -> StudyConfig:
    """The configuration with its GPU share; what that share rules out (peak CUDA memory as an objective of trials
    on the CPU) as one line."""
    try:
        return replace(config, gpus_per_trial=share.gpus_per_trial, max_concurrent=share.max_concurrent)
    except ConfigError as error:
        raise UsageError(str(error)) from None


def cache_data(config: StudyConfig, index: DatasetIndex) -> tuple[DatasetIndex, dict[str, CachedSplit], list[str]]:
    """Train and val decoded into the cache (test stays out of it: the leakage check hashes it on its own); the
    disk checked for the smaller sizes of a resolution schedule too (cache_smaller)."""
    try:
        return prepare_splits(index, ("train", "val"), config.img_size, config.cache_dir, smaller_sizes(config))
    except DataError as error:
        raise UsageError(str(error)) from None


def cache_smaller(config: StudyConfig, index: DatasetIndex) -> dict[int, tuple[CachedSplit, CachedSplit]]:
    """Train and val at each smaller size the study's resolution schedule trains at, decoded once before any
    trial starts (none with epochs as the fidelity). `index`: cache_data's, without the images that failed."""
    try:
        return cache_resized(index, smaller_sizes(config), config.cache_dir)
    except DataError as error:
        raise UsageError(str(error)) from None


def start_ray(verbose: bool = False, address: str | None = None) -> None:
    """A private, single-machine Ray that listens on 127.0.0.1 only; or, given an address, the running cluster.

    The trial processes' own output reaches the terminal with `verbose` only: what a trial
    has to say comes through its results and, when it fails, its error file (Ray's logs
    under /tmp/ray keep the rest). Tune's own log lines likewise (quiet_tune_logs).
    """
    if address is not None:
        join_cluster(address, verbose)
    else:
        os.environ.setdefault(LOOPBACK_SWITCH, "0")
        if os.environ[LOOPBACK_SWITCH] == "0":
            ray_constants.ENABLE_RAY_CLUSTER = False  # read when Ray was imported: apply it now
        # address="local": a Ray of its own, never one that another `ray start` left running on this machine.
        ray.init(
            address="local",
            num_cpus=os.cpu_count(),
            include_dashboard=False,
            logging_level=logging.WARNING,
            log_to_driver=verbose,
        )
    quiet_tune_logs(verbose)


def quiet_tune_logs(verbose: bool) -> None:
    """Without `verbose`, Tune's own log lines stay off the terminal: the study's are one per trial event.

    Tune logs a failed trial as an ERROR with its whole traceback (EpochPrinter's line names the
    exception and the trial's error file instead), and Ctrl-C as WARNINGs that advise
    `Tuner.restore(...)` (the study prints its own --resume command). Tune's warning that trials wait
    for resources the cluster lacks stays: without it a study would wait in silence.
    """
    logging.getLogger(TUNE_LOGGER).setLevel(logging.NOTSET if verbose else logging.CRITICAL)
    for name in TUNE_LOGGERS_KEPT:
        logging.getLogger(name).setLevel(logging.NOTSET if verbose else logging.WARNING)


def join_cluster(address: str, verbose: bool) -> None:
    """ray.init on a running cluster (its nodes' own addresses, not loopback); its failures as one line.

    Ray's C++ client writes straight to the process's stderr: a refused token is a warning a second
    for 20 s before Ray gives up. Without `verbose` those lines go to a file that is dropped.
    """
    ray_constants.ENABLE_RAY_CLUSTER = True  # the loopback switch is for the private Ray only
    try:
        with contextlib.nullcontext() if verbose else stderr_dropped():
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=verbose)
    except AuthenticationError:  # RAY_AUTH_MODE=token and no token here: Ray refuses before it asks
        raise UsageError(token_refused(address)) from None
    except ConnectionError as error:
        if authentication_failed(error):  # the cluster asks for a token this machine did not send, or another
            raise UsageError(token_refused(address)) from None
        raise UsageError(
            f"--address {address}: {one_line(error)}; check that the cluster runs (`ray status` on its head) and "
            f"that this machine reaches it"
        ) from None


def authentication_failed(error: BaseException) -> bool:
    """Whether Ray's failure to connect was the cluster refusing this driver's token (Ray wraps the GCS client's
    AuthenticationError, as text, in a RuntimeError under its ConnectionError)."""
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, AuthenticationError) or "InvalidAuthToken" in str(cause):
            return True
        cause = cause.__cause__ or cause.__context__
    return False


@contextlib.contextmanager
def stderr_dropped() -> Iterator[None]:
    """File descriptor 2 into a temporary file for the block (C++ code writes there, past sys.stderr)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile() as sink:
            os.dup2(sink.fileno(), 2)
            try:
                yield
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
    finally:
        os.close(saved)


def shipped_to_cluster(
    train: CachedSplit, val: CachedSplit, resized: dict[int, tuple[CachedSplit, CachedSplit]]
) -> tuple[CachedSplit, CachedSplit, dict[int, tuple[CachedSplit, CachedSplit]]]:
    """The decoded images in memory (at every size a resolution schedule trains at), to reach the cluster's nodes
    through Ray's object store.

    The other machines cannot read this one's cache. Ray puts the trials' setup, images
    included, in the object store once; each node that runs trials holds one copy, which
    its trials share zero-copy.
    """
    train, val = train.loaded(), val.loaded()
    resized = {size: (smaller.loaded(), smaller_val.loaded()) for size, (smaller, smaller_val) in resized.items()}
    nbytes = train.nbytes + val.nbytes + sum(a.nbytes + b.nbytes for a, b in resized.values())
    print(
        f"Data: {megabytes(nbytes)} of decoded images go to the cluster through Ray's object "
        f"store (one copy on each node that runs trials)",
        flush=True,
    )
    return train, val, resized


def note_storage_on_cluster(storage_path: str) -> None:
    """A folder as --storage-path on a cluster of several nodes works only where every node mounts it alike:
    each trial writes its checkpoints on its own node, and the driver reads the best one back."""
    nodes = sum(node["Alive"] for node in ray.nodes())
    if nodes > 1 and not is_uri(storage_path):
        print(
            f"note: --storage-path {storage_path} is a folder: each of the cluster's {nodes} nodes must see it at "
            f"that path (a shared mount), or give a URI such as s3://bucket/prefix",
            flush=True,
        )


# ---------------------------------------------------------------- execute


def execute_study(study: PreparedStudy, started: float, verbose: bool = False) -> int:
    """Run the study on the Ray that prepare_study started, then stop Ray; `started`: time.monotonic() at launch."""
    try:
        return tune_and_record(study, started, verbose)
    finally:
        ray.shutdown()


def tune_and_record(study: PreparedStudy, started: float, verbose: bool = False) -> int:
    """Open the parent run, run the trials, export the winner and explain the study; the exit code."""
    config = study.config
    client = mlflow_client(config.tracking_uri)
    dataset = data_record(study.index)
    with interrupts_ignored():  # the study's run is opened whole, never left RUNNING half-described
        experiment_id, parent_id = open_or_reopen(client, study, dataset)
    record = StudyRecord(client, experiment_id, parent_id, dataset)
    status, timed = "FAILED", False
    watch = watch_cluster(study, lambda: abandon_on_lost_cluster(record, study, started))
    try:
        setup = trial_setup(config, study.spec, study.train, study.val, study.resized)
        searched = search_tuner(study, setup, record, verbose).fit()
        # Ctrl-C: Ray returns normally, having saved where each trial was.
        interrupted = unfinished_trials(config.experiment_location, config.search_trials)
        confirmation = None if interrupted else confirm_best(study, setup, record, verbose)
        if interrupted or (confirmation is not None and confirmation.winner is None):
            status = "KILLED"
            print_resume_hint(config, address=study.address)
            return 130
        with staged(config.storage_path, config.name, BEST_DIR) as folder:  # a URI's: uploaded beside the trials
            best = export_winner(client, config, parent_id, study.index.classes, searched, confirmation, folder)
        status = "FINISHED" if best is not None else "FAILED"
        log_elapsed(client, parent_id, started)  # before the report, which states it
        timed = True
        summary = explain_study(client, config, parent_id, study, best)
        print_closing(config, best, join(config.study_location, BEST_DIR), experiment_id, summary)
        return 0 if best is not None else 1
    except KeyboardInterrupt:
        status = "KILLED"
        print_resume_hint(config, address=study.address)
        return 130
    except Exception:
        if not disk_full(config.storage_path):
            raise
        print(
            f"search/run.py: error: the disk under --storage-path {config.storage_path} is full "
            f"({megabytes(free_bytes(config.storage_path))} free): free some space, then resume the study; "
            f"trials that failed for want of space stay failed",
            file=sys.stderr,
        )
        print_resume_hint(config, "stopped on a full disk", study.address)
        return 1
    finally:
        if watch is not None:
            watch.stop()
        with interrupts_ignored():  # a second Ctrl-C must not leave the record half-closed
            close_open_children(client, experiment_id, parent_id)
            if not timed:
                log_elapsed(client, parent_id, started)
            client.set_terminated(parent_id, status)


def watch_cluster(study: PreparedStudy, on_lost: Callable[[], None]) -> ClusterWatch | None:
    """On a cluster, a watch on its head that calls on_lost once the head is gone; None on a private Ray."""
    if study.address is None:
        return None
    return ClusterWatch(ray.get_runtime_context().gcs_address, on_lost)


def abandon_on_lost_cluster(record: StudyRecord, study: PreparedStudy, started: float) -> None:
    """The cluster's head is gone: say so and how to resume, close the study's record as interrupted, and exit.

    Ray would end this process itself a minute later, with neither. Called from the watch's
    thread while Tune waits in the main one, so it ends the process at once.
    """
    print(
        f"search/run.py: error: lost the Ray cluster at {study.address}: its head has not answered for "
        f"{ClusterWatch.LOST_AFTER_S:.0f} s; start it again, then resume the study",
        file=sys.stderr,
        flush=True,
    )
    print_resume_hint(study.config, "lost its Ray cluster", study.address)
    close_open_children(record.client, record.experiment_id, record.parent_id)
    log_elapsed(record.client, record.parent_id, started)
    record.client.set_terminated(record.parent_id, "KILLED")
    os._exit(1)


def explain_study(
    client: MlflowClient, config: StudyConfig, parent_id: str, study: PreparedStudy, best: Winner | None
) -> StudySummary | None:
    """The Optuna trials Ray lost to a kill settled, and the study's report (None if it could not be made:
    the trials and the winner are recorded already, and stay so)."""
    try:
        optuna_study = load_study(config.optuna_storage, config.name) if config.optuna_storage else None
        if optuna_study is not None:
            fail_orphans(optuna_study)
        return log_study_report(client, config, parent_id, study.index, study.space.searched, best, optuna_study)
    except Exception as error:
        print(f"warning: the study's report (note, plots, importances) failed: {one_line(error)}", flush=True)
        return None


def log_elapsed(client: MlflowClient, parent_id: str, started: float) -> None:
    """This session's time added to the study's elapsed_s (a resumed study has had sessions before)."""
    before = client.get_run(parent_id).data.metrics.get(ELAPSED_METRIC, 0.0)
    client.log_metric(parent_id, ELAPSED_METRIC, before + time.monotonic() - started)


def open_or_reopen(client: MlflowClient, study: PreparedStudy, dataset: dict) -> tuple[str, str]:
    """The study's parent run: new, or the interrupted one reopened on --resume."""
    if study.resume_run_id:
        return reopen_parent_run(client, study.resume_run_id), study.resume_run_id
    if study.index.ignored_files:
        print(f"note: ignored {study.index.ignored_files} file(s) that are not images", flush=True)
    if study.skipped_images:
        named = ", ".join(study.skipped_images[:3])
        print(f"warning: skipped {len(study.skipped_images)} unreadable image(s), e.g. {named}", flush=True)
    claimed = claim_optuna_study(study.config)  # the name's claim in a database that machines share
    try:
        return open_parent_run(
            client, study.config, study.index, dataset, study.skipped_images, study.space.searched, leaks=study.leaks
        )
    except BaseException:
        if claimed:
            drop_optuna_study(study.config)
        raise


@dataclass(frozen=True)
class StudyRecord:
    """Where a study's runs go: MLflow, the study's experiment and run, and its data as their dataset input."""

    client: MlflowClient
    experiment_id: str
    parent_id: str
    dataset: dict

    def trial_runs(self, config: StudyConfig, **kwargs) -> MlflowTrials:
        """The Tune callback that mirrors a Tune run's trials as child runs (kwargs: MlflowTrials' own)."""
        return MlflowTrials(config.tracking_uri, self.experiment_id, self.parent_id, config, self.dataset, **kwargs)


def search_tuner(study: PreparedStudy, setup: TrialSetup, record: StudyRecord, verbose: bool) -> tune.Tuner:
    """The Tuner of the study's search: an interrupted one restored, or a new one (a new study's, or an
    extension's: a Tune run of its own beside the earlier trials, continuing their Optuna study)."""
    config = study.config
    if study.resume_run_id and exists(config.experiment_location, TUNER_STATE):
        return restore_tuner(setup, config, config.experiment_location)
    if config.trials_before:
        record.client.log_text(record.parent_id, config.to_yaml(), CONFIG_FILE)  # the study's new total of trials
        record.client.set_tag(record.parent_id, EXTENDED_TAG, f"{config.trials_before} -> {config.trials}")
        print(f"Extending study {config.name} from {config.trials_before} to {config.trials} trials", flush=True)
    if study.warm_start:
        after = ", after the recipe" if config.runs_recipe else ""
        print(f"Warm start: {len(study.warm_start)} best configuration(s) of study {config.warm_start} first{after}")
    callbacks = [record.trial_runs(config, tune_run="/".join(config.search_part))]
    write_config_beside_trials(config)
    return make_tuner(study.space, setup, config, callbacks, verbose=verbose, first=study.warm_start)


@dataclass(frozen=True)
class Confirmation:
    """The confirmation's Tune run and what it decided."""

    retrains: list[Retrain]
    results: ResultGrid
    winner: Confirmed | None
    """None: interrupted before every retrain ended (Ctrl-C)."""

    def winner_configs(self) -> list[dict]:
        """The configurations (seed in each) of the winner's retrains."""
        assert self.winner is not None, "asked of a confirmation that ended"
        return [retrain.config for retrain in self.retrains if retrained_trial(retrain.label) == self.winner.label]


def confirm_best(study: PreparedStudy, setup: TrialSetup, record: StudyRecord, verbose: bool) -> Confirmation | None:
    """With --confirm K: the search's K best configurations retrained with more seeds, the winner by mean score,
    the spread on the study's run. None without --confirm, or where no trial completed its budget."""
    config = study.config
    client, experiment_id, parent_id = record.client, record.experiment_id, record.parent_id
    chosen = candidates(client, experiment_id, parent_id, config) if config.confirm else []
    if not chosen:
        return None
    retrains = plan_retrains(chosen, config)
    if study.resume_run_id and exists(config.confirm_location, TUNER_STATE):
        tuner = restore_tuner(setup, config, config.confirm_location)
    else:
        print(
            f"\nConfirming the {confirmed_what(chosen, config)} with {config.confirm_seeds} more "
            f"seed(s) each: {len(retrains)} retrains of {config.epochs} epochs",
            flush=True,
        )
        callbacks = [
            record.trial_runs(
                config,
                names=TrialNames(config.trials, given=tuple(retrain.label for retrain in retrains)),
                tune_run=confirm_run(config),
                tags={ROLE_TAG: CONFIRM_ROLE},
                recipe=frozenset(retrain.label for retrain in retrains if retrain.recipe),
            )
        ]
        tuner = make_confirm_tuner(setup, config, retrains, callbacks, verbose)
    results = tuner.fit()
    if unfinished_trials(config.confirm_location, len(retrains)):  # Ctrl-C, as for the search
        return Confirmation(retrains, results, None)
    confirmed = confirmed_scores(client, experiment_id, parent_id, config, chosen)
    winner = confirmed_winner(confirmed, config.mode)
    log_confirmation(client, parent_id, confirmed, winner, config)
    print(confirm_table(confirmed, winner, config), flush=True)
    return Confirmation(retrains, results, winner)


def write_config_beside_trials(config: StudyConfig) -> None:
    """study.yaml in the Ray experiment folder too, for whoever browses the trials' files."""
    write_text(config.to_yaml(), config.storage_path, config.name, CONFIG_FILE)


def export_winner(
    client: MlflowClient,
    config: StudyConfig,
    parent_id: str,
    classes: list[str],
    searched: ResultGrid,
    confirmation: Confirmation | None,
    out: Path,
) -> Winner | None:
    """The study's winner, exported to `out` and logged on its run; its record, or None where there is none.

    With a confirmation: the confirmed configuration, from its best retrain's checkpoint, named by its search trial.
    Without: the search's best checkpoint, unless an extended study's earlier searches had one as good, which then
    stays the winner (TIE_RULE: the earlier trial)."""
    labels = trial_labels(client, parent_id)
    if confirmation is not None:
        kept = best_checkpoint(confirmation.results, config, confirmation.winner_configs(), labels)
    else:
        kept = best_checkpoint(searched, config, labels=labels)
        earlier = earlier_winner(client, parent_id) if config.trials_before else None
        if earlier is not None and (kept is None or not improves(config.mode, kept[1], earlier.best_value)):
            return earlier
    if kept is None:
        return None
    confirmed = confirmation.winner if confirmation is not None else None
    label = confirmed.label if confirmed is not None else labels.get(kept[2])
    best = export_checkpoint(config, classes, kept[0], kept[2], out, label)
    log_best(client, config, parent_id, best, out)
    return best


def trial_labels(client: MlflowClient, parent_id: str) -> dict[str, str]:
    """The names (t07, a confirmation's "t07 seed 1") of the study's trials by Ray's trial id, from their runs."""
    experiment_id = client.get_run(parent_id).info.experiment_id
    runs = client.search_runs([experiment_id], f"tags.`{PARENT_TAG}` = '{parent_id}'", max_results=50_000)
    return {
        run.data.tags[TRIAL_ID_TAG]: run.data.tags[TRIAL_LABEL_TAG]
        for run in runs
        if TRIAL_ID_TAG in run.data.tags and TRIAL_LABEL_TAG in run.data.tags
    }


def earlier_winner(client: MlflowClient, parent_id: str) -> Winner | None:
    """The winner an extended study had before (its best_config.yaml, read as final.py reads it), or None."""
    if not has_best_config(client, parent_id):
        return None
    return read_best_config(client, client.get_run(parent_id))


def best_checkpoint(
    results: ResultGrid, config: StudyConfig, configs: list[dict] | None = None, labels: dict[str, str] | None = None
) -> tuple[Checkpoint, float, str] | None:
    """The best checkpoint of the Tune run's trials (or of those trained with `configs` only), its score and
    its trial's id. Among equal scores the earliest trial's, by its name in `labels` (Ray's trial id -> t07):
    TIE_RULE, as the study's report ranks them; a trial without a name comes last.

    Ray keeps one checkpoint per trial at its best score (the newer among equals), and its latest."""
    names = labels or {}
    scored = [
        (checkpoint, float(metrics[config.metric]), str(metrics["trial_id"]))
        for result in (results[index] for index in range(len(results)))  # indexable, not iterable
        if configs is None or result.config in configs
        for checkpoint, metrics in result.best_checkpoints or []
        if math.isfinite(metrics.get(config.metric, math.nan))
    ]
    if not scored:
        return None
    sign = -1.0 if config.mode == "max" else 1.0

    def rank(kept: tuple[Checkpoint, float, str]) -> tuple[float, tuple[float, ...]]:
        name = names.get(kept[2])
        return sign * kept[1], (trial_order(name) if name is not None else (math.inf,))

    return min(scored, key=rank)


def export_checkpoint(
    config: StudyConfig, classes: list[str], checkpoint: Checkpoint, trial_id: str, out: Path, label: str | None
) -> Winner:
    """The winner's best_config.yaml and best_model.pt, written to the folder `out`; its record (`label`: the
    trial's name, t07).

    The checkpoint is read through Ray's filesystem (as_directory downloads one kept in a bucket)."""
    with checkpoint.as_directory() as directory:
        state = load_trial_checkpoint(directory)
    out.mkdir(parents=True, exist_ok=True)
    winner = Winner.from_trial(
        config,
        trial_id=trial_id,
        metrics=state["metrics"],
        hyperparameters=state["hyperparameters"],
        classes=classes,
        model_spec=state["model_spec"],
        trial=label,
    )
    (out / BEST_CONFIG_FILE).write_text(winner.to_yaml())
    # The study's window too: predict.py decodes DICOM images with it, as the trials did.
    replace(ModelFile.from_trial_checkpoint(state, classes), window=config.window).save(out / BEST_MODEL_FILE)
    return winner


def disk_full(path: str) -> bool:
    """Whether a folder --storage-path is out of space (a URI's storage says so in its own error)."""
    return not is_uri(path) and free_bytes(path) < FULL_DISK_BYTES


def free_bytes(path: str) -> int:
    return shutil.disk_usage(existing_ancestor(Path(path))).free
