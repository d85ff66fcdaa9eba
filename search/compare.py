"""Which classifier for these images? Search, retrain and test cnn, vit and hybrid on one split, then compare.

    python search/compare.py --data path/to/images --trials 30

Runs the three studies (run.py) with the same data, split, seed and budget, retrains each
winner (final.py), tests each once on the same held-out images, and reports every test
metric with a 95 % bootstrap interval, McNemar's test and a paired interval for each pair,
the costs (parameters, training throughput, inference latency, peak memory, the search's
GPU-hours) and which model to pick. `--studies A B C` compares studies already run.
Running the same command again continues an interrupted comparison; nothing finished is redone.

Only the standard library, PyYAML and MLflow load until the plan is checked; torch after.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from search.errors import UsageError
from search.records.study_config import STUDY_NAME, name_problem
from search.run import QUIET_ENVIRONMENT, RUNTIME_ENVIRONMENT, build_parser
from trainables.config import MODEL_NAMES

DEFAULT_NAME = "compare"


def build_compare_parser() -> tuple[argparse.ArgumentParser, list[argparse.Action]]:
    """compare.py's parser, and the actions it hands on to each study's run.py (all of run.py's but the
    model, space, name and --resume, which the comparison sets per study)."""
    parser = build_parser(
        prog="search/compare.py",
        description="Search, retrain and test cnn, vit and hybrid on the same data, split and budget; compare them "
        "with confidence intervals, paired significance tests and costs. The study flags below are run.py's, "
        "handed on to each study.",
        one_study=False,
    )
    forwarded = [action for action in parser._actions if action.dest != "help"]
    what = parser.add_argument_group("what to compare")
    what.add_argument(
        "--name",
        default=DEFAULT_NAME,
        help="the comparison's name; its studies are <name>-cnn, <name>-vit and <name>-hybrid. "
        "The same command with the same name continues an interrupted comparison",
    )
    what.add_argument("--models", nargs="+", choices=MODEL_NAMES, default=list(MODEL_NAMES), help="models to compare")
    what.add_argument(
        "--studies",
        nargs="+",
        metavar="STUDY",
        default=None,
        help="compare these finished studies (same --data, --seed and --smoke) instead of running new ones; "
        "their retrains are reused where they recorded per-image test predictions",
    )
    what.add_argument(
        "--reference",
        metavar="TIMM_NAME",
        default=None,
        help="also train a larger timm model once (e.g. convnext_tiny, resnet50) with the recipe's default "
        "hyperparameters, to check the lightweight models against it",
    )
    what.add_argument(
        "--ensemble",
        type=int,
        metavar="K",
        default=None,
        help="also set an ensemble beside the single models: the K best distinct configurations of the study whose "
        "winner scored best on validation (never the test), retrained as final.py --ensemble K retrains them, "
        "their calibrated probabilities averaged; tested on the same images, with its cost (parameters, latency, "
        "training compute in recipe trainings)",
    )
    what.add_argument(
        "--resamples", type=int, default=2000, help="bootstrap resamples of the test images (at least 1000)"
    )
    what.add_argument("--out", default=None, help="report folder (default: comparisons/<name>)")
    parser._action_groups.insert(2, parser._action_groups.pop())  # --help lists the comparison's own flags first
    return parser, forwarded


def forwarded_argv(args: argparse.Namespace, actions: list[argparse.Action]) -> list[str]:
    """The study flags the user gave, as run.py's command line (defaults left out: run.py has the same)."""
    argv: list[str] = []
    for action in actions:
        value = getattr(args, action.dest)
        if value == action.default:
            continue
        flag = action.option_strings[0]
        if isinstance(action, argparse.BooleanOptionalAction):
            argv.append(flag if value else f"--no-{flag.removeprefix('--')}")
        elif action.nargs == 0:  # store_true
            argv.append(flag)
        elif isinstance(value, list):  # append: --weights, repeated
            argv += [item for v in value for item in (flag, str(v))]
        elif str(value).startswith("-"):  # --window=-600,1500: argparse would take '-600,1500' for a flag
            argv.append(f"{flag}={value}")
        else:
            argv += [flag, str(value)]
    return argv


def check_arguments(args: argparse.Namespace) -> None:
    problems = []
    if not STUDY_NAME.fullmatch(args.name):
        problems.append(name_problem(args.name))
    if args.resamples < 1000:
        problems.append(f"--resamples {args.resamples}: use at least 1000 for a stable 95 % interval")
    if args.studies is not None and len(args.studies) < 2:
        problems.append("--studies needs at least two studies to compare")
    if args.studies is None and len(set(args.models)) < 2:
        problems.append("--models needs at least two different models to compare")
    if args.ensemble is not None and args.ensemble < 2:
        problems.append(f"--ensemble {args.ensemble}: an ensemble needs at least 2 members")
    if problems:
        raise UsageError("; ".join(problems))


def check_reference(args: argparse.Namespace) -> None:
    """The reference is a timm model, with weights at hand unless --no-pretrained (timm loads here)."""
    if args.reference is None:
        return
    from search.cli import require_pretrained, weights_files
    from trainables.models import reference_problem

    problem = reference_problem(args.reference)
    if problem:
        raise UsageError(problem)
    if not args.no_pretrained:
        require_pretrained((args.reference,), weights_files(args.weights))


def main(argv: list[str] | None = None) -> int:
    parser, forwarded = build_compare_parser()
    args = parser.parse_args(argv)
    environment = RUNTIME_ENVIRONMENT if args.verbose else {**RUNTIME_ENVIRONMENT, **QUIET_ENVIRONMENT}
    for key, value in environment.items():
        os.environ.setdefault(key, value)
    args.out = args.out or str(Path("comparisons") / args.name)
    run_argv = forwarded_argv(args, forwarded)
    try:
        check_arguments(args)
        from search.comparison.plan import check_ensemble, plan_comparison, plan_existing  # MLflow, not yet torch

        plan = plan_existing(args) if args.studies else plan_comparison(args, run_argv)
        check_ensemble(plan, args.ensemble)
        check_reference(args)
        from search.comparison.driver import run_comparison  # torch, timm

        return run_comparison(args, plan, run_argv)
    except UsageError as error:
        print(f"search/compare.py: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("search/compare.py: interrupted before any study started", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
