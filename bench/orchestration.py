"""Orchestration overhead: what Ray Tune + Optuna + ASHA + MLflow cost around the trials.

A fixed-cost trainable (sleeps a fixed time per epoch, saves a small checkpoint, and
reports metrics the way train_trial does) runs a study of N trials x E epochs through
the project's real orchestration: `make_tuner` with the real MLflow callback (a temp
SQLite store, a parent run opened by search.tracking.study_run.open_parent_run), the real
PruneAwareOptunaSearch and ASHA, the real vit search space. The same trials then run
in a plain in-process Optuna loop (create_study + optimize, same sleep and checkpoint).

Measured, per run:
  wall       launch (MLflow parent run, ray.init, Tuner) -> Tuner.fit returns
  own        sum over trials of their own work (sleeps + checkpoint saves)
  start-up   launch -> the first trial's first line
  overhead   (wall - start-up - own / concurrency) * concurrency / trials: seconds per trial
             that are neither the trial's work nor the one-off start-up
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np

TRIALS, EPOCHS = 8, 3


def score(config: dict, epoch: int) -> float:
    """A deterministic accuracy with an optimum, rising with epochs: TPE and ASHA have something to do."""
    lr = config.get("lr", 3e-4)
    rotation = config.get("rotation_deg", 15.0)
    quality = 0.95 - 0.15 * abs(np.log10(lr) - np.log10(3e-4)) - 0.2 * abs(rotation / 30 - 0.4)
    return float(np.clip(quality * (1 - 0.4 / epoch), 0.0, 1.0))


def epoch_metrics(config: dict, epoch: int, epochs: int) -> dict:
    """Every key train_trial reports: engine metrics, lr, epoch and finished."""
    acc = score(config, epoch)
    return {
        "train_loss": 2.4 * (1 - acc),
        "val_loss": 2.5 * (1 - acc),
        "val_acc": acc,
        "val_balanced_acc": acc,
        "val_macro_f1": acc,
        "lr": config.get("lr", 3e-4),
        "epoch": epoch,
        "finished": epoch >= epochs,
    }


def save_small_checkpoint(directory: str, epoch: int) -> None:
    import torch

    from trainables.checkpoint import CHECKPOINT_FILE

    torch.save({"model": {"weight": torch.zeros(64, 64)}, "epoch": epoch}, Path(directory) / CHECKPOINT_FILE)


def fixed_cost_trial(config: dict, seconds: float, epochs: int, log_path: str) -> None:
    """A Ray Tune function trainable shaped like train_trial, whose work is a sleep."""
    # Imports first: a real trial's module imports torch when Ray loads it, before its body runs.
    import torch  # noqa: F401
    from ray import tune

    from trainables.config import Hyperparameters

    started = time.time()
    Hyperparameters.from_dict(config)  # the same boundary check as a real trial
    tune.get_checkpoint()
    trial_id = tune.get_context().get_trial_id()
    for epoch in range(1, epochs + 1):
        work = time.perf_counter()
        time.sleep(seconds)
        metrics = epoch_metrics(config, epoch, epochs)
        with tempfile.TemporaryDirectory() as directory:
            save_small_checkpoint(directory, epoch)
            own = time.perf_counter() - work
            with open(log_path, "a") as log:  # before report: an ASHA stop ends the function there
                log.write(json.dumps({"trial": trial_id, "start": started, "epoch": epoch, "own": own}) + "\n")
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(directory))


def ray_study(tmp: Path, seconds: float, max_concurrent: int, trials: int = TRIALS, epochs: int = EPOCHS) -> dict:
    """The project's real orchestration around the fixed-cost trainable."""
    import ray
    from ray import tune

    from search.records.study_config import StudyConfig
    from search.records.trial_status import TrialStatus
    from search.study.spaces import load_space
    from search.study.tuning import make_tuner, trial_setup
    from search.tracking.schema import STATUS_TAG
    from search.tracking.store import close_open_children, mlflow_client
    from search.tracking.study_run import data_record, open_parent_run
    from search.tracking.trials import MlflowTrials
    from trainables.data import CachedSplit, DatasetIndex
    from trainables.models import ModelSpec

    for key, value in {
        "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
        "RAY_DEDUP_LOGS": "0",
        "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
    }.items():
        os.environ.setdefault(key, value)  # as search/run.py sets them

    name = f"bench-mc{max_concurrent}"
    uri = f"sqlite:///{tmp}/mlflow/mlflow.db"
    log_path = tmp / f"{name}.jsonl"
    space = load_space(Path(__file__).resolve().parents[1] / "spaces" / "vit.yaml", "vit")
    unused = CachedSplit(str(tmp / "unused.npy"), np.zeros(0, dtype=np.int64))  # the fixed-cost trainable reads no data
    # The project's defaults (search/run.py): ASHA grace period 2, reduction factor 3, one core per trial.
    config = StudyConfig(
        name=name,
        model="vit",
        trials=trials,
        data="synthetic",
        space=space.path,
        epochs=epochs,
        img_size=224,
        pretrained=False,
        gpus_per_trial=0.0,
        max_concurrent=max_concurrent,
        recipe=False,  # every trial at a fixed cost, each stoppable by ASHA: the overhead is what is measured
        storage_path=str(tmp / "ray"),
        cache_dir=str(tmp / "cache"),
        tracking_uri=uri,
        experiment="bench",
    )
    setup = trial_setup(config, ModelSpec("vit", 11, 224, pretrained=False), unused, unused)
    index = DatasetIndex("synthetic", [f"class_{c:02d}" for c in range(11)], {"train": [], "val": [], "test": []})
    trainable = tune.with_resources(
        tune.with_parameters(fixed_cost_trial, seconds=seconds, epochs=epochs, log_path=str(log_path)),
        {"cpu": config.cpus_per_trial, "gpu": 0},
    )

    logging.disable(logging.INFO)  # not MLflow's table-creation lines
    try:
        mlflow_client(uri)  # create the store first: a new SQLite store's migrations are a one-off, not start-up
    finally:
        logging.disable(logging.NOTSET)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
        launch = time.time()
        client = mlflow_client(uri)
        dataset = data_record(index)
        experiment_id, parent_id = open_parent_run(client, config, index, dataset, [], space.searched)
        parent_s = time.time() - launch
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level=logging.WARNING)
        ray_init_s = time.time() - launch - parent_s
        try:
            callbacks = [MlflowTrials(uri, experiment_id, parent_id, config, dataset)]
            results = make_tuner(space, setup, config, callbacks, trainable=trainable).fit()
            wall = time.time() - launch
            errors = results.num_errors
        finally:
            close_open_children(client, experiment_id, parent_id)
            client.set_terminated(parent_id, "FINISHED")
            ray.shutdown()
        teardown_s = time.time() - launch - wall

    lines = [json.loads(line) for line in log_path.read_text().splitlines()] if log_path.exists() else []
    if errors or not lines:
        raise RuntimeError(
            f"the fixed-cost study failed ({errors} trial errors); its output:\n{printed.getvalue()[-3000:]}"
        )
    own = sum(line["own"] for line in lines)
    startup = min(line["start"] for line in lines) - launch
    children = client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")
    return {
        "max_concurrent": max_concurrent,
        "trials": len({line["trial"] for line in lines}),
        "epochs_run": len(lines),
        "wall_s": wall,
        "own_s": own,
        "startup_s": startup,
        "parent_run_s": parent_s,
        "ray_init_s": ray_init_s,
        "teardown_s": teardown_s,
        "overhead_per_trial_s": ((wall - startup) * max_concurrent - own) / trials,
        "overhead_per_epoch_s": ((wall - startup) * max_concurrent - own) / len(lines),
        "mlflow_children": len(children),
        "pruned": sum(1 for run in children if run.data.tags.get(STATUS_TAG) == TrialStatus.PRUNED),
    }


def optuna_loop(tmp: Path, seconds: float, trials: int = TRIALS, epochs: int = EPOCHS) -> dict:
    """The same trials in a plain in-process Optuna loop: TPE, the same space, no Ray, no MLflow."""
    import optuna

    from search.study.spaces import load_space
    from trainables.config import Hyperparameters

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = load_space(Path(__file__).resolve().parents[1] / "spaces" / "vit.yaml", "vit")
    own = 0.0

    def objective(trial: optuna.Trial) -> float:
        nonlocal own
        config = space.configuration(trial)
        Hyperparameters.from_dict(config)
        best = 0.0
        for epoch in range(1, epochs + 1):
            work = time.perf_counter()
            time.sleep(seconds)
            metrics = epoch_metrics(config, epoch, epochs)
            with tempfile.TemporaryDirectory(dir=tmp) as directory:
                save_small_checkpoint(directory, epoch)
            own += time.perf_counter() - work
            trial.report(metrics["val_acc"], epoch)
            best = max(best, metrics["val_acc"])
        return best

    start = time.perf_counter()
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=0))
    study.optimize(objective, n_trials=trials)
    wall = time.perf_counter() - start
    return {"wall_s": wall, "own_s": own, "overhead_per_trial_s": (wall - own) / trials, "epochs_run": trials * epochs}


def run(
    device=None, quick: bool = False, seconds: float | None = None, concurrency: tuple[int, ...] | None = None
) -> dict:
    """device is unused: the orchestration is the same on any machine."""
    seconds = seconds if seconds is not None else (0.1 if quick else 1.0)
    concurrency = concurrency or ((1,) if quick else (1, 2))
    out = {"trials": TRIALS, "epochs": EPOCHS, "seconds_per_epoch": seconds}
    with tempfile.TemporaryDirectory(prefix="bench-orchestration-") as tmp:
        out["optuna"] = optuna_loop(Path(tmp), seconds)
        for max_concurrent in concurrency:
            out[f"ray_mc{max_concurrent}"] = ray_study(Path(tmp), seconds, max_concurrent)
    return out
