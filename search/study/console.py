"""What a study prints: one line per trial event instead of Ray's tables, the winner, and how to resume."""

from __future__ import annotations

from ray import tune

from search.study.config import StudyConfig
from search.tracking.schema import BEST_CONFIG_FILE, BEST_MODEL_FILE, absolute_uri, exception_line, trial_outcome


class EpochPrinter(tune.Callback):
    """One line per trial event, instead of Ray's tables."""

    def __init__(self, epochs: int, metric: str):
        self.epochs, self.metric, self.numbers = epochs, metric, {}

    def label(self, trial) -> str:
        number = self.numbers.setdefault(trial.trial_id, len(self.numbers) + 1)
        return f"trial {number:>3} ({trial.trial_id})"

    def on_trial_start(self, iteration, trials, trial, **info):
        config = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.config.items())
        print(f"{self.label(trial)} started: {config}", flush=True)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        print(
            f"{self.label(trial)} epoch {result['epoch']:>2}/{self.epochs}  train_loss {result['train_loss']:.4f}  "
            f"val_loss {result['val_loss']:.4f}  val_acc {result['val_acc']:.4f}  "
            f"{self.metric} {result[self.metric]:.4f}",
            flush=True,
        )

    def on_trial_complete(self, iteration, trials, trial, **info):
        print(f"{self.label(trial)} {trial_outcome(trial.last_result, error=False)}", flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        print(f"{self.label(trial)} failed: {exception_line(trial.error_file)}", flush=True)


def print_resume_hint(config: StudyConfig, why: str = "interrupted") -> None:
    print(
        f"\nStudy {config.name} {why}; finished trials are kept. Resume it with:\n"
        f"  python search/run.py --model {config.model} --name {config.name} --resume"
        f" --storage-path {config.storage_path} --cache-dir {config.cache_dir} --tracking-uri {config.tracking_uri}",
        flush=True,
    )


def print_closing(config: StudyConfig, best: dict | None, best_dir: str, experiment_id: str) -> None:
    """The winner (or that there is none), where its files are, and how to look at the study."""
    if best is None:
        print(f"\nNo trial of study {config.name} produced a result: see the failed runs in MLflow.")
    else:
        print(
            f"\nBest trial {best['trial_id']}: {best['metric']} = {best['best_value']:.4f} "
            f"at epoch {best['best_epoch']}"
        )
        for key, value in best["hyperparameters"].items():
            print(f"  {key:<20} {value}")
        print(f"Config:     {best_dir}/{BEST_CONFIG_FILE}")
        print(f"Checkpoint: {best_dir}/{BEST_MODEL_FILE}")
        print(f"Retrain:    python search/final.py --study {config.name}")
    print(f"MLflow:     mlflow ui --backend-store-uri {absolute_uri(config.tracking_uri)} --host 127.0.0.1 --port 5000")
    print(f"            then open http://127.0.0.1:5000/#/experiments/{experiment_id}/runs")
