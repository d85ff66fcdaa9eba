"""What a study prints: one line per trial event instead of Ray's tables, the winner, and how to resume."""

from __future__ import annotations

import re
import shlex

from ray import tune

from search.records.location import join
from search.records.study_config import StudyConfig
from search.records.winner import Winner
from search.study.chance import at_chance
from search.study.gain import compute_line, recipe_line
from search.study.pareto import FRONT_PLOT, FRONT_TABLE, front_lines
from search.study.report import StudySummary, chance_level, counts_line, duration, tie_line, winner_label
from search.tracking.schema import (
    BEST_CONFIG_FILE,
    BEST_MODEL_FILE,
    TrialNames,
    exception_line,
    mlflow_lines,
    runs_page,
    trial_outcome,
)
from trainables.config import METRIC_MODES, keep_best, knobs_of
from trainables.fidelity import EPOCH_IMG_SIZE

QUALIFIED_EXCEPTION = re.compile(r"^(?:[A-Za-z_]\w*\.)+([A-Z]\w*)(?=:|$)")
"""A traceback's last line that names its exception with the module path: `package.module.Name: message`."""


class EpochPrinter(tune.Callback):
    """One line per trial event, instead of Ray's tables; trials by their MLflow names (t00, t01, ...)."""

    img_size: int | None = None
    """The study's image size: an epoch trained smaller (resolution as the fidelity) says its size. A class default
    for a printer pickled before it had one (Ray restores callbacks as pickled)."""

    recipe: frozenset[str] = frozenset()
    """The names of the trials that train the recipe (t00, a confirmation's "t00 seed 1"): their lines say so."""

    def __init__(
        self,
        epochs: int,
        metric: str,
        names: TrialNames,
        img_size: int | None = None,
        recipe: frozenset[str] = frozenset(),
    ):
        self.epochs, self.metric, self.names, self.img_size = epochs, metric, names, img_size
        self.recipe = recipe
        self.best: dict[str, float] = {}
        """Each trial's best score so far, for the line that says how it ended."""

    @property
    def mode(self) -> str:
        return METRIC_MODES[self.metric]

    def label(self, trial) -> str:
        return self.names.of(trial.experiment_tag)

    def on_trial_start(self, iteration, trials, trial, **info):
        config = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.config.items())
        print(f"{self.label(trial)} started{self.recipe_mark(trial)}: {config}", flush=True)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        shown = dict.fromkeys(("train_loss", "val_loss", "val_acc", self.metric))  # the metric once, in order
        scores = "  ".join(f"{key} {result[key]:.4f}" for key in shown)
        size = result.get(EPOCH_IMG_SIZE)
        smaller = f"  at {size} px" if size and self.img_size and size < self.img_size else ""
        print(f"{self.label(trial)} epoch {result['epoch']:>2}/{self.epochs}  {scores}{smaller}", flush=True)
        keep_best(self.best, trial.trial_id, result[self.metric], self.mode)

    def on_trial_complete(self, iteration, trials, trial, **info):
        outcome = trial_outcome(trial.last_result, error=False)
        epoch, best = (trial.last_result or {}).get("epoch"), self.best.get(trial.trial_id)
        ending = f" after epoch {epoch}, best {self.metric} {best:.4f}" if epoch and best is not None else ""
        print(f"{self.label(trial)} {outcome}{ending}{self.recipe_mark(trial)}", flush=True)

    def recipe_mark(self, trial) -> str:
        return " (recipe)" if self.label(trial) in self.recipe else ""

    def on_trial_error(self, iteration, trials, trial, **info):
        print(f"{self.label(trial)} failed: {failure(trial)}", flush=True)

    def on_trial_recover(self, iteration, trials, trial, **info):
        retry = f"{trial.run_metadata.num_failures} of {trial.max_failures}"
        print(f"{self.label(trial)} failed, retried from its last checkpoint ({retry}): {failure(trial)}", flush=True)


def failure(trial) -> str:
    """Why a trial failed, in a line: its exception's last line, and where the whole traceback is kept."""
    kept = error_log(trial)
    return short_exception(exception_line(trial.error_file)) + (f" (full log: {kept})" if kept else "")


def short_exception(line: str) -> str:
    """An exception's line without its module path: 'NonFiniteLoss: ...', not 'trainables.engine.NonFiniteLoss: ...'."""
    return QUALIFIED_EXCEPTION.sub(r"\1", line, count=1)


def error_log(trial) -> str | None:
    """Where a failed trial's error.txt (its whole traceback) is kept: in its folder under --storage-path (Ray
    writes it on the driver and copies it there with the experiment's state), a bucket's as a URI. None: no file."""
    name = trial.run_metadata.error_filename
    try:
        folder, kind = trial.path, trial.storage.storage_filesystem.type_name  # pyarrow's: 'local', 's3', ...
    except (AttributeError, RuntimeError):  # a trial without a folder yet
        return trial.error_file
    if not name or not folder:
        return trial.error_file
    return f"{folder}/{name}" if kind == "local" else f"{kind}://{folder}/{name}"


def print_resume_hint(config: StudyConfig, why: str = "interrupted", address: str | None = None) -> None:
    """address: the Ray cluster the study ran on, to run on again (None: a private local Ray)."""
    where = {
        "--storage-path": config.storage_path,
        "--cache-dir": config.cache_dir,
        "--tracking-uri": config.tracking_uri,
        **({"--address": address} if address else {}),
    }
    print(
        f"\nStudy {config.name} {why}; finished trials are kept. Resume it with:\n"
        f"  python search/run.py --model {config.model} --name {config.name} --resume "
        + " ".join(f"{flag} {shlex.quote(value)}" for flag, value in where.items()),  # a URI's '&' is quoted
        flush=True,
    )


def print_closing(
    config: StudyConfig, best: Winner | None, best_location: str, experiment_id: str, summary: StudySummary | None
) -> None:
    """How the study went, the winner (or that there is none), where its files are (best_location: a folder, or a
    URI such as s3://bucket/prefix/<study>/best), how to look at it."""
    print()
    if summary is not None:
        print(f"Study {config.name}: {counts_line(summary)} in {duration(summary.elapsed_s)}.")
    if best is None:
        print(f"No trial of study {config.name} produced a result: see the failed runs in MLflow.")
    else:
        chance = chance_level(config.metric, summary.num_classes) if summary else None
        against = f" (chance {chance:.4f})" if chance is not None else ""
        trial = winner_label(summary, best) if summary else best.trial_or_id
        print(f"Best trial {trial}: {best.metric} = {best.best_value:.4f}{against} at epoch {best.best_epoch}")
        if summary is not None and (tie := tie_line(summary)):
            print(tie)
        for key, value in knobs_of(config.model, best.hyperparameters.to_dict()).items():
            print(f"  {key:<20} {value:.4g}" if isinstance(value, float) else f"  {key:<20} {value}")
    if summary is not None:
        if best is not None and (recipe := recipe_line(summary)):
            print(f"Recipe:     {recipe}")
        print(f"Compute:    {compute_line(summary)}")
    if best is not None:
        print(f"Config:     {join(best_location, BEST_CONFIG_FILE)}")
        print(f"Checkpoint: {join(best_location, BEST_MODEL_FILE)}")
        print(f"Retrain:    python search/final.py --study {config.name}")
    if summary is not None and (stuck := at_chance(summary)) is not None:
        print(f"note: {stuck.line(summary)}")
    if summary is not None and summary.tradeoff is not None and summary.tradeoff.points:
        print("\n".join(front_lines(summary.tradeoff, config.name)))
        print(f"Front:      {FRONT_PLOT} and {FRONT_TABLE} on the study's MLflow run")
    print("\n".join(mlflow_lines(config.tracking_uri, runs_page(config.tracking_uri, experiment_id, config.name))))
    if config.optuna_storage:
        print(f"Optuna:     optuna-dashboard {config.optuna_storage}   (pip install optuna-dashboard)")
