"""Search hyperparameters for one of the three classifiers.

    python search/run.py --model cnn --trials 30 --data path/to/images

Only the standard library is imported until the arguments are valid, so --help
and argument errors answer at once; Ray, torch and timm load afterwards.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import fields, replace

from search.cli import (
    DEFAULT_CACHE_DIR,
    DEFAULT_TRACKING_URI,
    WINDOW_HELP,
    DefaultsFormatter,
    OneLineParser,
    add_weights_argument,
    given_options,
)
from search.errors import UsageError
from search.records.study_config import FIDELITIES, FULL, LEAK_POLICIES, SMOKE, STUDY_DEFAULTS, StudyConfig
from search.study.cluster import auth_environment, ray_address
from search.study.config import new_config
from trainables.config import FLAG_HELP, METRICS, MODEL_NAMES, OBJECTIVES, SpeedOptions

RUNTIME_ENVIRONMENT = {
    "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",  # MLflow is the record
    "RAY_DEDUP_LOGS": "0",
    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # a machine-local Ray on 127.0.0.1 (search.study.driver.start_ray)
}
"""Set before Ray and MLflow are imported, which read them then; with RAY_AUTH_MODE, which depends on the Ray
(search.study.cluster.auth_environment)."""
QUIET_ENVIRONMENT = {
    "RAY_AIR_NEW_OUTPUT": "0",  # Tune's older reporter, silent at verbose=0 (the newer one prints a config box)
    "MLFLOW_LOGGING_LEVEL": "WARNING",  # not "Creating initial MLflow database tables..."
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # reading study.yaml back on --resume
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",  # a server's "View run" lines: the closing lines say where
}
"""Added without --verbose: the study's own lines are all the terminal shows."""


def gpu_fraction(value: str) -> float | str:
    if value == "auto":
        return value
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is neither a number nor 'auto'") from None


def column_names(value: str) -> tuple[str, ...]:
    """'site, Sex' as ('site', 'sex'): a manifest's column names are read lower-case."""
    return tuple(name.strip().lower() for name in value.split(","))


def build_parser(
    prog: str = "search/run.py",
    description: str = "Find the best hyperparameters for one lightweight image classifier: "
    "Optuna TPE proposes, ASHA stops weak trials, MLflow records everything.",
    *,
    one_study: bool = True,
) -> argparse.ArgumentParser:
    """run.py's arguments; compare.py takes the same ones (one_study=False: without --model, --space, --name and
    --resume, which it sets per study) and hands them on to run.py."""
    parser = OneLineParser(prog=prog, description=description, formatter_class=DefaultsFormatter)
    what = parser.add_argument_group("what to search")
    if one_study:
        what.add_argument(
            "--model",
            required=True,
            choices=MODEL_NAMES,
            help="cnn: tf_efficientnetv2_s; vit: vit_tiny_patch16_224; hybrid: both",
        )
    what.add_argument(
        "--trials",
        type=int,
        default=None,
        help="number of trials"
        + ("; with --resume on a finished study, its new total: the search goes on where it ended" * one_study)
        + f" (default: {STUDY_DEFAULTS['trials']})",
    )
    what.add_argument(
        "--data",
        default="data",
        help="a folder with one sub-folder per class (split 70/15/15; by PatientID where it holds DICOM files), "
        "a folder with train/ val/ test/, a CSV manifest (columns path,label[,group][,split]: split by patient "
        "group unless a split column says), or 'synthetic' (built-in, 11 classes; 'synthetic:C' for C)",
    )
    if one_study:
        what.add_argument(
            "--subgroups",
            type=column_names,
            default=None,
            metavar="COLUMN[,COLUMN]",
            help="extra columns of a CSV manifest (e.g. site,sex), read with the data and recorded with the study: "
            "final.py reports accuracy, balanced accuracy, sensitivity and specificity per value of each, with 95 %% "
            "intervals (other unknown columns are refused; columns that look like patient ids or names too)",
        )
    what.add_argument("--window", default=None, metavar="CENTER,WIDTH", help=WINDOW_HELP)
    what.add_argument(
        "--on-leak",
        default=STUDY_DEFAULTS["on_leak"],
        choices=LEAK_POLICIES,
        help="exact or near-duplicate images across train, val and test, checked before training: 'warn' says so "
        "and goes on, 'fail' refuses the data (exit code 2, nothing written)",
    )
    if one_study:
        what.add_argument("--space", default=None, help="search-space YAML (default: spaces/<model>.yaml)")
    what.add_argument(
        "--metric",
        default=STUDY_DEFAULTS["metric"],
        choices=METRICS,
        help="what the search optimises (val_loss is minimised)",
    )
    what.add_argument(
        "--objective",
        default=STUDY_DEFAULTS["objective"],
        metavar="|".join(OBJECTIVES),
        help="'accuracy': --metric alone; 'accuracy,COST': a multi-objective search for the Pareto front of "
        "--metric against the parameters, the inference latency per image or the peak training memory "
        "(CUDA only); no ASHA then: each trial stops itself (early_stop_patience) or at --epochs",
    )
    what.add_argument(
        "--seed", type=int, default=STUDY_DEFAULTS["seed"], help="seeds the split, the TPE sampler and every trial"
    )
    if one_study:
        what.add_argument(
            "--warm-start",
            default=None,
            metavar="STUDY",
            help="first evaluate the best configurations of this earlier study (same --tracking-uri), then search on",
        )
        what.add_argument(
            "--warm-start-top",
            type=int,
            default=STUDY_DEFAULTS["warm_start_top"],
            metavar="K",
            help="how many of the earlier study's best configurations go first",
        )
    what.add_argument(
        "--no-recipe",
        action="store_true",
        help="leave out the recipe trial (otherwise the study's first trial, t00, trains the knobs' defaults "
        "clipped into the space to its whole budget, and the winner's gain over it is reported)",
    )
    what.add_argument(
        "--confirm",
        type=int,
        default=None,
        metavar="K",
        help="once the search ends, retrain its K best configurations with more seeds and pick the winner by "
        f"mean score; 0: the single best trial wins (default: {STUDY_DEFAULTS['confirm']})",
    )
    what.add_argument(
        "--confirm-seeds",
        type=int,
        default=None,
        metavar="S",
        help=f"seeds each confirmed configuration is retrained with, besides its search trial's "
        f"(default: {STUDY_DEFAULTS['confirm_seeds']})",
    )

    training = parser.add_argument_group("training")
    training.add_argument(
        "--epochs",
        type=int,
        default=None,
        help=f"epoch budget per trial (default {FULL.epochs}; {SMOKE.epochs} with --smoke)",
    )
    training.add_argument(
        "--img-size",
        type=int,
        default=None,
        help=f"square image size (default {FULL.img_size}; {SMOKE.img_size} with --smoke)",
    )
    training.add_argument(
        "--fidelity",
        default=None,
        choices=FIDELITIES,
        help="what makes ASHA's early rungs cheap: 'epochs' (every epoch at --img-size) or 'resolution' (the "
        "epochs up to its first rung at half of --img-size, up to its second at three quarters, multiples of 16) "
        f"(default: {STUDY_DEFAULTS['fidelity']})",
    )
    training.add_argument(
        "--no-pretrained", action="store_true", help="random initialisation instead of timm's pretrained weights"
    )
    add_weights_argument(training)
    training.add_argument(
        "--smoke",
        action="store_true",
        help=f"CPU-friendly profile: {SMOKE.img_size} px, {SMOKE.epochs} epochs, "
        f"{(SMOKE.per_class or {}).get('train')} training images per class",
    )

    speed = parser.add_argument_group("speed on CUDA (ignored on the CPU)")
    for option in fields(SpeedOptions):  # each CUDA speed switch a --flag / --no-flag pair, from its field
        speed.add_argument(
            f"--{option.name.replace('_', '-')}",
            action=argparse.BooleanOptionalAction,
            default=option.default,
            help=option.metadata[FLAG_HELP],
        )

    resources = parser.add_argument_group("resources and early stopping")
    resources.add_argument(
        "--address",
        default=None,
        metavar="auto|HOST:PORT",
        help="run the trials on a running Ray cluster (default: $RAY_ADDRESS if set, else a private local Ray)",
    )
    resources.add_argument(
        "--gpus-per-trial",
        type=gpu_fraction,
        default="auto",
        metavar="F|auto",
        help="GPU share per trial, 0 for the CPU; 'auto' measures one training step of the largest "
        "configuration and packs as many trials as fit in free memory (0 without a GPU)",
    )
    resources.add_argument(
        "--cpus-per-trial", type=int, default=STUDY_DEFAULTS["cpus_per_trial"], help="CPU cores per trial"
    )
    resources.add_argument(
        "--max-concurrent", type=int, default=None, help="most trials at once (default: as many as resources allow)"
    )
    resources.add_argument(
        "--max-failures",
        type=int,
        default=STUDY_DEFAULTS["max_failures"],
        help="retries of a crashed trial from its last checkpoint",
    )
    resources.add_argument(
        "--grace-period",
        type=int,
        default=STUDY_DEFAULTS["grace_period"],
        help="ASHA: epochs every trial gets before it can be stopped",
    )
    resources.add_argument(
        "--reduction-factor",
        type=int,
        default=STUDY_DEFAULTS["reduction_factor"],
        help="ASHA: keep the top 1/N at each rung",
    )

    tracking = parser.add_argument_group("where results go")
    if one_study:
        tracking.add_argument("--name", default=None, help="study name (default: <model>-<timestamp>)")
    tracking.add_argument(
        "--storage-path",
        default="ray_results",
        help="Ray Tune trial folders and checkpoints: a folder (shared by every node on a cluster) or a URI such as "
        "s3://bucket/prefix (an S3-compatible endpoint from AWS_ENDPOINT_URL)",
    )
    tracking.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR, help="decoded-image cache shared by trials")
    tracking.add_argument("--tracking-uri", default=DEFAULT_TRACKING_URI, help="MLflow tracking store")
    tracking.add_argument("--experiment", default=None, help="MLflow experiment (default: the model name)")
    tracking.add_argument(
        "--optuna-storage",
        default=None,
        metavar="URI",
        help="database of the Optuna study, for optuna-dashboard (default: optuna.db beside a SQLite "
        "--tracking-uri, else under a folder --storage-path; needed with a server and a URI --storage-path)",
    )
    if one_study:
        tracking.add_argument(
            "--resume", action="store_true", help="continue the interrupted study --name with its own settings"
        )
    tracking.add_argument("--verbose", action="store_true", help="show Ray's and MLflow's own output too")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    address = ray_address(args.address)
    environment = {**RUNTIME_ENVIRONMENT, **auth_environment(address), **({} if args.verbose else QUIET_ENVIRONMENT)}
    for key, value in environment.items():
        os.environ.setdefault(key, value)
    try:
        if args.resume:
            from search.study.resume import resumed_config  # MLflow: the record says how the study ran

            config, resume_run_id = resumed_config(args, given_options(build_parser(), argv))
        else:
            config, resume_run_id = new_config(args), None
        from search.tracking.claim import claim_study

        # Held until this process ends: a second run.py of this name is refused, even one started together.
        with claim_study(config, resuming=resume_run_id is not None):
            return claimed_study(config, resume_run_id, address, args.verbose)
    except UsageError as error:
        print(f"search/run.py: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before the study started: nothing was written
        print("search/run.py: interrupted", file=sys.stderr)
        return 130


def claimed_study(config: StudyConfig, resume_run_id: str | None, address: str | None, verbose: bool) -> int:
    """The study whose name this process holds: checked, then run; its exit code."""
    from search.study.preflight import check_study  # the data layer (numpy, PIL), once the arguments are good

    checked = check_study(config, resume_run_id)
    from search.tracking.study_run import open_stores  # MLflow and Optuna, not yet torch or Ray

    open_stores(config, resume_run_id, create=False)  # a taken name, answered before the heavy imports
    if resume_run_id is None:  # at the start, before the data is cached: time to restart with another --metric
        from search.study.imbalance import warn_if_imbalanced

        warn_if_imbalanced(checked, config.metric)
    if config.warm_start and resume_run_id is None:
        from search.study.warm_start import warm_start_configs  # Optuna: the earlier study's trials

        checked = replace(checked, warm_start=tuple(warm_start_configs(config, checked.space)))
    from search.study.driver import run_study  # torch and Ray load once the study is known to be good

    return run_study(config, checked, verbose=verbose, address=address)


if __name__ == "__main__":
    sys.exit(main())
