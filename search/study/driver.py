"""From a checked configuration to a finished study: prepare (weights, store, cache, Ray, GPU share), then execute.

`prepare_study` does what can still fail on bad input (pretrained weights, the store,
the data's images, GPU memory) before anything is written to MLflow, and starts Ray.
`execute_study` opens the study's parent run, runs Ray Tune, and exports the winner.
`--gpus-per-trial auto` measures the GPU in a process of its own, which runs while the
driver caches the data and starts Ray.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import ray
import torch
import yaml
from mlflow.tracking import MlflowClient
from ray._private import ray_constants
from ray.exceptions import AuthenticationError
from ray.tune import ResultGrid

from search.cli import interrupts_ignored, require_pretrained
from search.errors import UsageError, one_line
from search.final_model.winner import winner_record
from search.study.cluster import missing_token
from search.study.config import CONFIG_FILE, StudyConfig
from search.study.console import print_closing, print_resume_hint
from search.study.gpu_share import GpuProbe, GpuTooSmall, choose_gpu_fraction
from search.study.preflight import CheckedStudy
from search.study.report import StudySummary
from search.study.spaces import Space
from search.study.tuning import make_tuner, restore_tuner, speed_options, trial_setup, unfinished_trials
from search.tracking.optuna_store import fail_orphans, load_study
from search.tracking.schema import BEST_CONFIG_FILE, BEST_DIR, BEST_MODEL_FILE, ELAPSED_METRIC
from search.tracking.store import close_open_children, mlflow_client
from search.tracking.study_report import log_study_report
from search.tracking.study_run import data_record, log_best, open_parent_run, open_stores, reopen_parent_run
from search.tracking.trials import MlflowTrials
from trainables.checkpoint import ModelFile, load_trial_checkpoint
from trainables.data import CachedSplit, DataError, DatasetIndex, existing_ancestor, megabytes, prepare_splits
from trainables.spec import BACKBONES, ModelSpec

LOOPBACK_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
"""Ray's switch for a machine-local Ray (its default on Windows and macOS). Set to 0, Ray takes 127.0.0.1 as
the node's address, so its gRPC servers and agents listen on loopback instead of on every interface.
Ray's worker processes read it from the environment; this process's Ray, imported already, is told directly."""
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
    skipped_images: list[str]
    resume_run_id: str | None = None


@dataclass(frozen=True)
class GpuShare:
    """Each trial's share of the GPU (0: the CPU), and how many trials run at once."""

    gpus_per_trial: float
    max_concurrent: int


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
    gpu_probe = start_gpu_probe(
        config, checked
    )  # --gpus-per-trial auto: a process of its own, overlapping what follows
    # Checked at once on this machine; on a cluster once joined, from the cluster's resources.
    share = given_gpu_share(config, *local_resources()) if gpu_probe is None and address is None else None
    try:
        if config.pretrained:
            require_pretrained(BACKBONES[config.model], config.weights)
        open_stores(config, checked.resume_run_id)
        index, splits, skipped = cache_data(config, checked.index)
        start_ray(verbose, address)
        if share is None:
            share = given_gpu_share(config, *cluster_resources()) if gpu_probe is None else None
        if share is None:
            share = measured_gpu_share(config, gpu_probe)
        resolved = replace(config, gpus_per_trial=share.gpus_per_trial, max_concurrent=share.max_concurrent)
        return PreparedStudy(
            config=resolved,
            space=checked.space,
            index=index,
            spec=checked.spec,
            train=splits["train"],
            val=splits["val"],
            skipped_images=skipped,
            resume_run_id=checked.resume_run_id,
        )
    except BaseException:
        if gpu_probe is not None:
            gpu_probe.cancel()
        ray.shutdown()
        raise


def cache_data(config: StudyConfig, index: DatasetIndex) -> tuple[DatasetIndex, dict[str, CachedSplit], list[str]]:
    """Train and val decoded into the cache (test stays unread)."""
    try:
        return prepare_splits(index, ("train", "val"), config.img_size, config.cache_dir)
    except DataError as error:
        raise UsageError(str(error)) from None


def start_ray(verbose: bool = False, address: str | None = None) -> None:
    """A private, single-machine Ray that listens on 127.0.0.1 only; or, given an address, the running cluster.

    The trial processes' own output reaches the terminal with `verbose` only: what a trial
    has to say comes through its results and, when it fails, its error file (Ray's logs
    under /tmp/ray keep the rest).
    """
    if address is not None:
        join_cluster(address, verbose)
        return
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


def join_cluster(address: str, verbose: bool) -> None:
    """ray.init on a running cluster (its nodes' own addresses, not loopback); its failures as one line."""
    ray_constants.ENABLE_RAY_CLUSTER = True  # the loopback switch is for the private Ray only
    try:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=verbose)
    except AuthenticationError:
        raise UsageError(missing_token(address)) from None
    except ConnectionError as error:
        raise UsageError(
            f"--address {address}: {one_line(error)}; check that the cluster runs (`ray status` on its head) and "
            f"that this machine has the head's token (~/.ray/auth_token; a wrong one fails the same way)"
        ) from None


def local_resources() -> tuple[int, int]:
    """(GPUs, CPU cores) of this machine: what a private Ray has."""
    return torch.cuda.device_count(), os.cpu_count() or 1


def cluster_resources() -> tuple[int, int]:
    """(GPUs, CPUs) of the Ray cluster joined: what its trials can be placed on, whichever node has them."""
    resources = ray.cluster_resources()
    return int(resources.get("GPU", 0)), int(resources.get("CPU", 1))


def start_gpu_probe(config: StudyConfig, checked: CheckedStudy) -> GpuProbe | None:
    """--gpus-per-trial auto on a GPU machine: the memory probe of the heaviest configuration, started; else None."""
    if config.gpus_per_trial is not None or not torch.cuda.is_available():
        return None
    heaviest = checked.space.heaviest()
    return GpuProbe(
        config.model,
        len(checked.index.classes),
        heaviest.batch_size,
        config.img_size,
        speed_options(config),
        **heaviest.model_knobs(),
    )


def given_gpu_share(config: StudyConfig, gpus: int, cpus: int) -> GpuShare:
    """The share --gpus-per-trial gives (0 for 'auto' without a GPU), checked against `gpus` GPUs and `cpus` CPUs."""
    if config.gpus_per_trial is None and gpus:  # auto, on a cluster whose GPUs this machine cannot probe
        raise UsageError(
            f"--gpus-per-trial auto measures a GPU of this machine, which has none, but the cluster has {gpus}: "
            f"give the share each trial takes, e.g. --gpus-per-trial 0.25"
        )
    gpus_per_trial = resolve_gpus(config.gpus_per_trial or 0.0, gpus)
    return GpuShare(
        gpus_per_trial, config.max_concurrent or trial_slots(gpus_per_trial, config.cpus_per_trial, gpus, cpus)
    )


def measured_gpu_share(config: StudyConfig, gpu_probe) -> GpuShare:
    """--gpus-per-trial auto: the share and the trials at once that the probe's numbers allow."""
    try:
        plan = choose_gpu_fraction(*gpu_probe.result())
    except GpuTooSmall as error:
        raise UsageError(str(error)) from None
    except RuntimeError as error:  # e.g. a GPU too full to open a CUDA context
        raise UsageError(
            f"--gpus-per-trial auto could not measure the GPU ({one_line(error)}): "
            f"give a share such as --gpus-per-trial 0.5, or 0 for the CPU"
        ) from None
    print(f"--gpus-per-trial auto: {plan.explanation}", flush=True)
    # The probe measured GPU 0; Ray places fractional trials on every GPU, assumed alike.
    trials = plan.trials * max(1, torch.cuda.device_count())
    return GpuShare(plan.fraction, config.max_concurrent or trials)


def resolve_gpus(requested: float, gpus: int) -> float:
    """A given --gpus-per-trial, refused where no GPU would take it."""
    if requested > 0 and not gpus:
        raise UsageError(
            f"--gpus-per-trial {requested} but no CUDA GPU is visible: pass --gpus-per-trial 0 to train on the CPU"
        )
    return requested


def trial_slots(gpus_per_trial: float, cpus_per_trial: int, gpus: int, cpus: int) -> int:
    """How many trials fit at once: GPU slots where trials take a GPU share, CPU cores otherwise."""
    if gpus_per_trial > 0:
        return max(1, int(gpus / gpus_per_trial + 1e-9))
    return max(1, cpus // cpus_per_trial)


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
    status, timed = "FAILED", False
    try:
        setup = trial_setup(config, study.spec, study.train, study.val)
        if study.resume_run_id:
            tuner = restore_tuner(setup, config)
        else:
            callbacks = [MlflowTrials(config.tracking_uri, experiment_id, parent_id, config, dataset)]
            tuner = make_tuner(study.space, setup, config, callbacks, verbose=verbose)
            write_config_beside_trials(config)
        results = tuner.fit()
        if unfinished_trials(config):  # Ctrl-C: Ray returns normally, having saved where each trial was
            status = "KILLED"
            print_resume_hint(config)
            return 130
        best = export_best(config, study.index.classes, results)
        if best is not None:
            log_best(client, config, parent_id, best, config.experiment_dir / BEST_DIR)
        status = "FINISHED" if best else "FAILED"
        log_elapsed(client, parent_id, started)  # before the report, which states it
        timed = True
        summary = explain_study(client, config, parent_id, study, best)
        print_closing(config, best, str(config.experiment_dir / BEST_DIR), experiment_id, summary)
        return 0 if best else 1
    except KeyboardInterrupt:
        status = "KILLED"
        print_resume_hint(config)
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
        print_resume_hint(config, "stopped on a full disk")
        return 1
    finally:
        with interrupts_ignored():  # a second Ctrl-C must not leave the record half-closed
            close_open_children(client, experiment_id, parent_id)
            if not timed:
                log_elapsed(client, parent_id, started)
            client.set_terminated(parent_id, status)


def explain_study(
    client: MlflowClient, config: StudyConfig, parent_id: str, study: PreparedStudy, best: dict | None
) -> StudySummary | None:
    """The Optuna trials Ray lost to a kill settled, and the study's report (None if it could not be made:
    the trials and the winner are recorded already, and stay so)."""
    try:
        optuna_study = load_study(config.optuna_storage, config.name) if config.optuna_storage else None
        if optuna_study is not None:
            fail_orphans(optuna_study)
        return log_study_report(
            client, config, parent_id, len(study.index.classes), study.space.searched, best, optuna_study
        )
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
    return open_parent_run(client, study.config, study.index, dataset, study.skipped_images, study.space.searched)


def write_config_beside_trials(config: StudyConfig) -> None:
    """study.yaml in the Ray experiment folder too, for whoever browses the trials' files."""
    config.experiment_dir.mkdir(parents=True, exist_ok=True)
    (config.experiment_dir / CONFIG_FILE).write_text(config.to_yaml())


def export_best(config: StudyConfig, classes: list[str], results: ResultGrid) -> dict | None:
    """The winner's best_config.yaml and best_model.pt, written to <experiment>/best/; its record, or None."""
    try:
        best = results.get_best_result(config.metric, config.mode, scope="all", filter_nan_and_inf=True)
    except RuntimeError:
        return None
    if not best.metrics:
        return None
    checkpoint = best.get_best_checkpoint(config.metric, config.mode)
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        state = load_trial_checkpoint(directory)
    out = config.experiment_dir / BEST_DIR
    out.mkdir(parents=True, exist_ok=True)
    record = winner_record(
        config, best.metrics["trial_id"], state["metrics"], state["hyperparameters"], classes, state["model_spec"]
    )
    (out / BEST_CONFIG_FILE).write_text(yaml.safe_dump(record, sort_keys=False))
    ModelFile.from_trial_checkpoint(state, classes).save(out / BEST_MODEL_FILE)
    return record


def disk_full(path: str) -> bool:
    return free_bytes(path) < FULL_DISK_BYTES


def free_bytes(path: str) -> int:
    return shutil.disk_usage(existing_ancestor(Path(path))).free
