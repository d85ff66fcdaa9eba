"""From validated arguments to a finished study: prepare (check and cache), then execute.

`prepare_study` does everything that can fail on bad input (space, data, pretrained
weights, GPU memory) before anything is written to MLflow, and starts Ray;
`execute_study` opens the study's parent run, runs Ray Tune, and logs the winner.

The checks that need neither torch nor Ray run first, so that a wrong path or space is
refused at once. `--gpus-per-trial auto` measures the GPU in a process of its own,
which runs while the driver caches the data and starts Ray.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from search.cli import interrupts_ignored, require_pretrained, weights_files
from search.errors import UsageError
from search.tracking import check_store_uri
from search.spaces import Space, SpaceError, load_space
from trainables.config import METRIC_MODES
from trainables.data import DataError, DatasetIndex, existing_ancestor, index_source, megabytes, prepare_splits, subsample
from trainables.spec import ModelSpec, validate_spec

SPACES_DIR = Path(__file__).resolve().parents[1] / "spaces"
SMOKE = {"img_size": 32, "epochs": 3, "per_class": {"train": 24, "val": 8, "test": 8}}
FULL = {"img_size": 224, "epochs": 15}
BEST_DIR = "best"


@dataclass
class PreparedStudy:
    name: str
    experiment: str
    tracking_uri: str
    space: Space
    index: DatasetIndex
    setup: "TrialSetup"  # noqa: F821 - imported lazily (torch)
    plan: "StudyPlan"  # noqa: F821 - imported lazily (ray)
    settings: dict
    """What the parent run records as params: enough to repeat the study."""
    skipped_images: list[str]
    resume_run_id: str | None = None
    """The parent run of the interrupted study this one continues."""


@dataclass
class CheckedInputs:
    """What the fast checks established: arguments, space, data index and model spec."""

    args: argparse.Namespace
    name: str
    img_size: int
    epochs: int
    space: Space
    index: DatasetIndex
    spec: ModelSpec
    weights: dict[str, str]
    resume_run_id: str | None


def prepare_study(args: argparse.Namespace) -> PreparedStudy:
    """Check and cache everything the study needs, and start Ray.

    Returns with Ray running; on any error Ray is stopped again and nothing was written.
    """
    inputs = check_inputs(args)
    gpu_probe = start_gpu_probe(inputs)  # --gpus-per-trial auto: a process of its own, overlapping what follows
    share = given_gpu_share(inputs) if gpu_probe is None else None  # checked at once
    try:
        if inputs.spec.pretrained:
            require_pretrained(inputs.args.model, inputs.weights)
        open_tracking_store(inputs)
        data = cache_data(inputs)
        start_ray()
        if share is None:
            share = measured_gpu_share(inputs, gpu_probe)
        return assemble_study(inputs, data, share)
    except BaseException:
        if gpu_probe is not None:
            gpu_probe.cancel()
        stop_ray()
        raise


def check_inputs(args: argparse.Namespace) -> CheckedInputs:
    """The checks that need neither torch nor Ray: space, data layout, model spec."""
    resume_run_id = None
    if args.resume:
        args, resume_run_id = resumed_arguments(args)
    check_store_uri(args.tracking_uri)
    profile = SMOKE if args.smoke else FULL
    img_size = args.img_size or profile["img_size"]
    name = args.name or new_study_name(args.model, args.storage_path)
    if resume_run_id is None and (Path(args.storage_path) / name).exists():
        raise UsageError(name_taken(name, f"under --storage-path {args.storage_path}"))
    try:
        space = load_space(args.space or SPACES_DIR / f"{args.model}.yaml", args.model)
        index = index_source(args.data, args.seed)
    except (SpaceError, DataError) as error:
        raise UsageError(str(error)) from None
    if args.smoke:
        index = subsample(index, SMOKE["per_class"], args.seed)
    weights = weights_files(args.weights)
    spec = ModelSpec(args.model, len(index.classes), img_size, pretrained=not args.no_pretrained,
                     weights_files=tuple(sorted(weights.items())))
    try:
        validate_spec(spec)
    except ValueError as error:
        raise UsageError(str(error)) from None
    return CheckedInputs(args, name, img_size, args.epochs or profile["epochs"], space, index, spec, weights,
                         resume_run_id)


def new_study_name(model: str, storage_path: str) -> str:
    """<model>-<timestamp>, with a suffix if a study of that second exists already."""
    stem = f"{model}-{datetime.now():%Y%m%d-%H%M%S}"
    name, number = stem, 1
    while (Path(storage_path) / name).exists():
        number += 1
        name = f"{stem}-{number}"
    return name


def name_taken(name: str, where: str) -> str:
    return f"a study named {name!r} exists already {where}: continue it with --resume, or choose another --name"


@dataclass
class CachedData:
    """The study's data, decoded once for every trial."""

    index: DatasetIndex
    """The index without the images that would not decode."""
    splits: dict
    """'train' and 'val' as CachedSplit: the decoded images the trials read."""
    skipped: list[str]
    """Images that would not decode."""


def open_tracking_store(inputs: CheckedInputs) -> None:
    """The MLflow store, created (or migrated) now rather than after the long work; a new study's name must be new there."""
    from search.tracking import mlflow_client, study_runs

    client = mlflow_client(inputs.args.tracking_uri)
    if inputs.resume_run_id is None and study_runs(client, inputs.name):
        raise UsageError(name_taken(inputs.name, f"in --tracking-uri {inputs.args.tracking_uri}"))


def cache_data(inputs: CheckedInputs) -> CachedData:
    """Train and val decoded into the cache (test stays unread)."""
    args = inputs.args
    try:
        index, cached, skipped = prepare_splits(inputs.index, ("train", "val"), inputs.img_size,
                                                Path(args.cache_dir).resolve())
    except DataError as error:
        raise UsageError(str(error)) from None
    return CachedData(index, cached, skipped)


LOOPBACK_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
"""Ray's switch for a machine-local Ray (its default on Windows and macOS). Set to 0, Ray takes 127.0.0.1 as
the node's address, so its gRPC servers and agents listen on loopback instead of on every interface.
Ray reads it when it is imported; its worker processes inherit it."""


def start_ray() -> None:
    """A private, single-machine Ray that listens on 127.0.0.1 only."""
    os.environ.setdefault(LOOPBACK_SWITCH, "0")
    import ray
    from ray._private import ray_constants

    if os.environ[LOOPBACK_SWITCH] == "0":  # Ray was imported before (a test, a notebook): apply it now
        ray_constants.ENABLE_RAY_CLUSTER = False
    # address="local": a Ray of its own, never one that another `ray start` left running on this machine.
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, logging_level=logging.WARNING)


def stop_ray() -> None:
    ray = sys.modules.get("ray")  # not imported: never started
    if ray is not None:
        ray.shutdown()


def start_gpu_probe(inputs: CheckedInputs):
    """--gpus-per-trial auto on a GPU machine: the memory probe, started; else None."""
    if inputs.args.gpus_per_trial != "auto":
        return None
    import torch

    if not torch.cuda.is_available():
        return None
    from search.resources import GpuProbe

    return GpuProbe(inputs.args.model, len(inputs.index.classes), inputs.space.largest("batch_size", 32), inputs.img_size,
                    speed_options(inputs.args))


def speed_options(args: argparse.Namespace) -> "SpeedOptions":  # noqa: F821 - imported lazily (torch)
    """The CUDA speed flags: the trials train with them, and the GPU probe measures with them."""
    from trainables.engine import SpeedOptions

    return SpeedOptions(args.amp, args.channels_last, args.cudnn_benchmark, args.compile)


@dataclass(frozen=True)
class GpuShare:
    """Each trial's share of the GPU (0: the CPU), and how many trials run at once."""

    gpus_per_trial: float
    max_concurrent: int


def given_gpu_share(inputs: CheckedInputs) -> GpuShare:
    """The share --gpus-per-trial gives (0 for 'auto' without a GPU), checked."""
    args = inputs.args
    gpus_per_trial = 0.0 if args.gpus_per_trial == "auto" else resolve_gpus(args.gpus_per_trial)
    return GpuShare(gpus_per_trial, args.max_concurrent or trial_slots(gpus_per_trial, args.cpus_per_trial))


def measured_gpu_share(inputs: CheckedInputs, gpu_probe) -> GpuShare:
    """--gpus-per-trial auto: the share and the trials at once that the probe's numbers allow."""
    import torch

    from search.resources import GpuTooSmall, choose_gpu_fraction

    try:
        plan = choose_gpu_fraction(*gpu_probe.result())
    except GpuTooSmall as error:
        raise UsageError(str(error)) from None
    except RuntimeError as error:  # e.g. a GPU too full to open a CUDA context
        cause = (str(error).strip() or type(error).__name__).splitlines()[0]
        raise UsageError(f"--gpus-per-trial auto could not measure the GPU ({cause}): "
                         f"give a share such as --gpus-per-trial 0.5, or 0 for the CPU") from None
    print(f"--gpus-per-trial auto: {plan.explanation}", flush=True)
    # The probe measured GPU 0; Ray places fractional trials on every GPU, assumed alike.
    trials = plan.trials * max(1, torch.cuda.device_count())
    return GpuShare(plan.fraction, inputs.args.max_concurrent or trials)


def assemble_study(inputs: CheckedInputs, data: CachedData, share: GpuShare) -> PreparedStudy:
    """The trials' setup, Tune's plan and the settings the parent run records."""
    from search.study import StudyPlan
    from trainables.trainable import TrialSetup

    args, space, spec, img_size, epochs = inputs.args, inputs.space, inputs.spec, inputs.img_size, inputs.epochs
    index, cached, skipped = data.index, data.splits, data.skipped
    gpus_per_trial, max_concurrent = share.gpus_per_trial, share.max_concurrent
    speed = speed_options(args)
    setup = TrialSetup(spec, cached["train"], cached["val"], epochs, args.metric, args.seed, gpus_per_trial,
                       args.cpus_per_trial, speed)
    plan = StudyPlan(inputs.name, args.trials, args.metric, args.seed, args.grace_period, args.reduction_factor,
                     gpus_per_trial, args.cpus_per_trial, max_concurrent, str(Path(args.storage_path).resolve()),
                     args.max_failures)
    settings = {
        "model": args.model, "trials": args.trials, "epochs": epochs, "img_size": img_size, "seed": args.seed,
        "metric": args.metric, "mode": METRIC_MODES[args.metric], "data": index.source, "smoke": args.smoke,
        "pretrained": spec.pretrained, "space": space.path, "grace_period": args.grace_period,
        "reduction_factor": args.reduction_factor, "gpus_per_trial": gpus_per_trial,
        "cpus_per_trial": args.cpus_per_trial, "max_concurrent": max_concurrent, "max_failures": args.max_failures,
        "amp": args.amp, "channels_last": args.channels_last, "cudnn_benchmark": args.cudnn_benchmark, "compile": args.compile,
        **{k: v for k, v in index.summary().items() if k not in ("source", "classes")},
        "ignored_files": index.ignored_files, "skipped_images": len(skipped),
    }
    return PreparedStudy(inputs.name, args.experiment or args.model, args.tracking_uri, space, index, setup, plan,
                         settings, skipped, inputs.resume_run_id)


# The study's own settings, as its parent run recorded them: (argument, type).
RESUMED_SETTINGS = {
    "trials": ("trials", int), "epochs": ("epochs", int), "img_size": ("img_size", int), "seed": ("seed", int),
    "metric": ("metric", str), "data": ("data", str), "smoke": ("smoke", lambda v: v == "True"),
    "pretrained": ("no_pretrained", lambda v: v != "True"), "space": ("space", str),
    "grace_period": ("grace_period", int), "reduction_factor": ("reduction_factor", int),
    "gpus_per_trial": ("gpus_per_trial", float), "cpus_per_trial": ("cpus_per_trial", int),
    "max_concurrent": ("max_concurrent", int), "max_failures": ("max_failures", int),
}


def resumed_arguments(args: argparse.Namespace) -> tuple[argparse.Namespace, str]:
    """The interrupted study's own settings, and its parent run; refuse what cannot resume."""
    if not args.name:
        raise UsageError("--resume needs --name STUDY: the name the interrupted run printed")
    parent = find_study(args.tracking_uri, args.name)
    where = f"--tracking-uri {args.tracking_uri}"
    if parent is None:
        raise UsageError(f"no study named {args.name!r} in {where}: check --name, or start it without --resume")
    if not (Path(args.storage_path) / args.name / "tuner.pkl").is_file():
        raise UsageError(f"study {args.name!r} has no trial state under --storage-path {args.storage_path}: pass the one it ran with")
    params = parent.data.params
    if params.get("model") != args.model:
        raise UsageError(f"study {args.name!r} searched --model {params.get('model')}: resume it with that model, not {args.model}")
    if parent.info.status == "FINISHED":
        raise UsageError(f"study {args.name!r} already finished: start a new one with another --name")
    resumed = argparse.Namespace(**vars(args))
    for key, (argument, convert) in RESUMED_SETTINGS.items():
        if key in params and params[key] != "None":
            setattr(resumed, argument, convert(params[key]))
    resumed.experiment = None
    return resumed, parent.info.run_id


def find_study(tracking_uri: str, name: str):
    """The newest parent run of study `name`, or None; opens no new store."""
    from search.tracking import mlflow_client, store_exists, study_runs

    if not store_exists(tracking_uri):
        return None
    parents = study_runs(mlflow_client(tracking_uri, create=False), name)
    return parents[0] if parents else None


def resolve_gpus(requested: float) -> float:
    """A given --gpus-per-trial, refused where no GPU would take it."""
    import torch

    if requested > 0 and not torch.cuda.device_count():
        raise UsageError(f"--gpus-per-trial {requested} but no CUDA GPU is visible: pass --gpus-per-trial 0 to train on the CPU")
    return requested


def trial_slots(gpus_per_trial: float, cpus_per_trial: int) -> int:
    """How many trials fit at once: GPU slots on a GPU machine, CPU cores otherwise."""
    import torch

    if gpus_per_trial > 0:
        return max(1, int(torch.cuda.device_count() / gpus_per_trial + 1e-9))
    return max(1, (os.cpu_count() or 1) // cpus_per_trial)


def execute_study(study: PreparedStudy) -> int:
    """Run the study on the Ray that prepare_study started, then stop Ray."""
    import ray

    try:
        return tune_and_record(study)
    finally:
        ray.shutdown()


def tune_and_record(study: PreparedStudy) -> int:
    """Open the parent run, run the trials, log the winner; the exit code."""
    from search.study import make_tuner, restore_tuner, unfinished_trials
    from search.callbacks import MlflowTrials
    from search.tracking import close_open_children, mlflow_client

    client = mlflow_client(study.tracking_uri)
    with interrupts_ignored():  # the study's run is opened whole, never left RUNNING half-described
        experiment_id, parent_id = open_parent_run(client, study)
    status = "FAILED"
    try:
        callbacks = [MlflowTrials(study.tracking_uri, experiment_id, parent_id, study.name)]
        if study.resume_run_id:
            tuner = restore_tuner(study.space, study.setup, study.plan)
        else:
            tuner = make_tuner(study.space, study.setup, study.plan, callbacks)
        results = tuner.fit()
        if unfinished_trials(study.plan):  # Ctrl-C: Ray returns normally, having saved where each trial was
            status = "KILLED"
            print_resume_hint(study)
            return 130
        found = log_best(client, parent_id, study, results)
        status = "FINISHED" if found else "FAILED"
        print_closing(study, found, experiment_id)
        return 0 if found else 1
    except KeyboardInterrupt:
        status = "KILLED"
        print_resume_hint(study)
        return 130
    except Exception:
        if not disk_full(study.plan.storage_path):
            raise
        print(f"search/run.py: error: the disk under --storage-path {study.plan.storage_path} is full "
              f"({megabytes(free_bytes(study.plan.storage_path))} free): free some space, then resume the study; "
              f"trials that failed for want of space stay failed", file=sys.stderr)
        print_resume_hint(study, "stopped on a full disk")
        return 1
    finally:
        with interrupts_ignored():  # a second Ctrl-C must not leave the record half-closed
            close_open_children(client, experiment_id, parent_id)
            client.set_terminated(parent_id, status)


FULL_DISK_BYTES = 16 * 2**20
"""Less free space than this under --storage-path explains a failure: a trial's checkpoint is larger."""


def disk_full(path: str) -> bool:
    return free_bytes(path) < FULL_DISK_BYTES


def free_bytes(path: str) -> int:
    return shutil.disk_usage(existing_ancestor(Path(path))).free


def open_parent_run(client, study: PreparedStudy) -> tuple[str, str]:
    """The study's parent run: new, or the interrupted one reopened on --resume."""
    from search.tracking import STUDY_TAG, get_or_create_experiment, log_params

    if study.resume_run_id:
        client.update_run(study.resume_run_id, status="RUNNING")
        return client.get_run(study.resume_run_id).info.experiment_id, study.resume_run_id
    experiment_id = get_or_create_experiment(client, study.experiment, study.tracking_uri)
    parent = client.create_run(experiment_id, run_name=study.name, tags={STUDY_TAG: study.name, "model": study.setup.model.name})
    parent_id = parent.info.run_id
    log_params(client, parent_id, study.settings)
    client.log_dict(parent_id, study.index.summary(), "data.json")
    client.log_artifact(parent_id, study.space.path)
    if study.index.ignored_files:
        print(f"note: ignored {study.index.ignored_files} file(s) that are not images", flush=True)
    if study.skipped_images:
        client.log_metric(parent_id, "skipped_images", len(study.skipped_images))
        client.log_text(parent_id, "\n".join(study.skipped_images), "skipped_images.txt")
        named = ", ".join(study.skipped_images[:3])
        print(f"warning: skipped {len(study.skipped_images)} unreadable image(s), e.g. {named}", flush=True)
    return experiment_id, parent_id


def print_resume_hint(study: PreparedStudy, why: str = "interrupted") -> None:
    model = study.setup.model.name
    print(f"\nStudy {study.name} {why}; finished trials are kept. Resume it with:\n"
          f"  python search/run.py --model {model} --name {study.name} --resume"
          f" --storage-path {study.plan.storage_path} --tracking-uri {study.tracking_uri}", flush=True)


def log_best(client, parent_id: str, study: PreparedStudy, results) -> dict | None:
    """Write the winner's config (YAML) and model (best checkpoint) and log them on the parent."""
    import torch
    import yaml

    from trainables.trainable import CHECKPOINT_FILE, load_checkpoint

    metric, mode = study.plan.metric, METRIC_MODES[study.plan.metric]
    try:
        best = results.get_best_result(metric, mode, scope="all", filter_nan_and_inf=True)
    except RuntimeError:
        return None
    checkpoint = best.get_best_checkpoint(metric, mode) if best.metrics else None
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        state = load_checkpoint(Path(directory) / CHECKPOINT_FILE)
    out = Path(study.plan.storage_path) / study.name / BEST_DIR
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "study": study.name,
        "trial_id": best.metrics["trial_id"],
        "metric": metric,
        "best_value": float(state["metrics"][metric]),
        "best_epoch": int(state["metrics"]["epoch"]),
        "hyperparameters": state["hyperparameters"],
        "model_spec": {k: v for k, v in state["model_spec"].items() if k != "weights_files"},
        "classes": study.index.classes,
        **{k: study.settings[k] for k in ("model", "epochs", "img_size", "seed", "data", "smoke", "pretrained")},
    }
    (out / "best_config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    model_file = out / "best_model.pt"
    torch.save(
        {"model": state["model"], "model_spec": state["model_spec"], "hyperparameters": state["hyperparameters"],
         "metrics": state["metrics"], "classes": study.index.classes},
        model_file,
    )
    client.log_artifact(parent_id, str(out / "best_config.yaml"), BEST_DIR)
    client.log_artifact(parent_id, str(model_file), BEST_DIR)
    client.log_metric(parent_id, f"best_{metric}", config["best_value"])
    client.set_tag(parent_id, "best_trial", config["trial_id"])
    return {"config": config, "dir": out}


def absolute_uri(uri: str) -> str:
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
    return uri


def print_closing(study: PreparedStudy, found: dict | None, experiment_id: str) -> None:
    if found is None:
        print(f"\nNo trial of study {study.name} produced a result: see the failed runs in MLflow.")
    else:
        config = found["config"]
        print(f"\nBest trial {config['trial_id']}: {config['metric']} = {config['best_value']:.4f} at epoch {config['best_epoch']}")
        for key, value in config["hyperparameters"].items():
            print(f"  {key:<20} {value}")
        print(f"Config:     {found['dir'] / 'best_config.yaml'}")
        print(f"Checkpoint: {found['dir'] / 'best_model.pt'}")
        print(f"Retrain:    python search/final.py --study {study.name}")
    print(f"MLflow:     mlflow ui --backend-store-uri {absolute_uri(study.tracking_uri)} --host 127.0.0.1 --port 5000")
    print(f"            then open http://127.0.0.1:5000/#/experiments/{experiment_id}/runs")
