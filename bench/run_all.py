"""Run every benchmark and print one table of measured numbers and ratios.

    python bench/run_all.py [--device cpu|cuda] [--quick] [--out bench/results.md]

Benchmarks, not tests: nothing here asserts. Each goal is the one the issue sets; the
'met' column compares against it where the goal applies to this device. The table also
goes to --out as markdown, and every raw number to the same path with .json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

from common import ROOT, Row, fmt, machine_info, markdown_table, resolve_device, text_table, verdict

BENCHMARKS = ("input", "trainable", "cuda", "speed", "orchestration")
MODELS = ("cnn", "vit", "hybrid")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when visible, else cpu")
    parser.add_argument("--quick", action="store_true", help="smaller sizes: about 1.5 minutes on a 2-core CPU")
    parser.add_argument(
        "--out", default=str(ROOT / "bench" / "results.md"), help="markdown table (default bench/results.md)"
    )
    parser.add_argument(
        "--model",
        default="vit",
        help="trainable-efficiency model(s), comma-separated, or 'all' "
        "(default vit; cnn and hybrid at 224 px are slow on a CPU)",
    )
    parser.add_argument("--img-size", type=int, default=224, help="trainable-efficiency image size (default 224)")
    parser.add_argument(
        "--workers",
        type=int,
        default=2,
        help="input pipeline: the baseline's DataLoader workers and the project's torch threads (default 2)",
    )
    parser.add_argument(
        "--only", default=",".join(BENCHMARKS), help=f"comma-separated subset of {','.join(BENCHMARKS)}"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    only = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(only) - set(BENCHMARKS))
    if unknown:
        print(
            f"run_all.py: unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}",
            file=sys.stderr,
        )
        return 2
    models = MODELS if args.model == "all" else tuple(m.strip() for m in args.model.split(",") if m.strip())
    if not models or set(models) - set(MODELS):
        print(f"run_all.py: --model takes {', '.join(MODELS)} or all, got {args.model!r}", file=sys.stderr)
        return 2
    device = resolve_device(args.device)
    info = machine_info(device.type)  # before the runs: the load average says how quiet the machine was

    import cuda_memory
    import input_pipeline
    import orchestration
    import speed_options
    import trainable_efficiency

    runners = {
        "input": lambda: input_pipeline.run(device, args.quick, workers=args.workers),
        **{
            f"trainable:{model}": lambda model=model: trainable_efficiency.run(
                device, args.quick, model=model, img_size=args.img_size
            )
            for model in models
        },
        "cuda": lambda: cuda_memory.run(device, args.quick),
        "speed": lambda: speed_options.run(device, args.quick),
        "orchestration": lambda: orchestration.run(device, args.quick),
    }
    results, seconds, failed = {}, {}, []
    started = time.perf_counter()
    for name in runners:
        if name.split(":")[0] not in only:
            continue
        print(f"[{name}] running ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        try:
            results[name] = runners[name]()
        except Exception as error:  # one broken benchmark should not hide the others
            traceback.print_exc()
            results[name] = {"error": f"{type(error).__name__}: {error}".splitlines()[0][:200]}
            failed.append(name)
        seconds[name] = time.perf_counter() - start
        print(f"[{name}] {seconds[name]:.0f} s", file=sys.stderr, flush=True)
        save_json(args.out, info, seconds, results)  # so far: a run cut short keeps what it measured
    total = time.perf_counter() - started

    rows = table_rows(results, device.type)
    command = "python bench/run_all.py " + " ".join(argv if argv is not None else sys.argv[1:])
    header = [f"{key}: {value}" for key, value in info.items()]
    header.append(
        "run time: " + ", ".join(f"{name} {s:.0f} s" for name, s in seconds.items()) + f"; total {total:.0f} s"
    )
    print("\n".join(["Benchmarks (" + command.strip() + ")", *header, "", text_table(rows)]))

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        "\n".join(
            [
                "# Benchmarks",
                "",
                f"`{command.strip()}`",
                "",
                *[f"- {line}" for line in header],
                "",
                markdown_table(rows),
                "",
            ]
        )
    )
    save_json(out, info, seconds, results)
    print(f"\nwritten: {out} and {out.with_suffix('.json')}")
    return 1 if failed else 0


def save_json(markdown_path, info: dict, seconds: dict, results: dict) -> None:
    path = Path(markdown_path).with_suffix(".json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": info, "seconds": seconds, "results": results}, indent=1, default=str))


# ---------------------------------------------------------------- the table


def table_rows(results: dict, device: str) -> list[Row]:
    rows: list[Row] = []
    builders = {
        "input": input_rows,
        "trainable": trainable_rows,
        "cuda": cuda_rows,
        "speed": speed_rows,
        "orchestration": orchestration_rows,
    }
    for name, result in results.items():
        if "error" in result:
            rows.append(Row(name, "FAILED", result["error"]))
        else:
            rows.extend(builders[name.split(":")[0]](result, device))
    return rows


def x(value: float) -> str:
    return f"{value:.2f}x"


def input_rows(r: dict, device: str) -> list[Row]:
    name = "input pipeline"
    cpu_goal = device == "cpu"
    what = f"{r['images']} JPEGs 512 px -> {r['img_size']} px, batch {r['batch']}, {r['workers']} workers/threads"
    return [
        Row(
            name,
            "images/s, steady-state epoch",
            fmt(r["project_img_s"]),
            fmt(r["torchvision_img_s"]),
            x(r["ratio"]),
            ">= 2x on CPU" if cpu_goal else "",
            verdict(r["ratio"] >= 2) if cpu_goal else "",
            "project: cache -> Learner.batches -> augment_batch(every augmentation on); "
            f"baseline: ImageFolder + PIL + v2 per sample; {what}",
        ),
        Row(
            name,
            "one-time cache build, s",
            fmt(r["cache_build_s"]),
            fmt(r["torchvision_first_epoch_s"]),
            "",
            "",
            "",
            "project: decode-once into the uint8 cache; baseline: its first epoch incl. starting workers",
        ),
        Row(
            name,
            "Learner.batches alone, images/s",
            fmt(r["batches_only_img_s"]),
            "",
            "",
            "",
            "",
            "gather from the memory map + to device + float, no augmentation",
        ),
        Row(
            name,
            "augment_batch alone, images/s",
            fmt(r["augment_only_img_s"]),
            "",
            "",
            ">= 3,000 on GPU",
            verdict(r["augment_only_img_s"] >= 3000) if device == "cuda" else "",
            f"a float batch of {r['batch']} already on the {device}",
        ),
    ]


def trainable_rows(r: dict, device: str) -> list[Row]:
    name = f"trainable efficiency ({r['model']})"
    what = (
        f"{r['model']} {r['img_size']} px, {r['train_images']} train + {r['val_images']} val images, "
        f"batch {r['batch']}, "
        f"{r['epochs']} epoch(s) measured"
    )
    parts = " / ".join(fmt(r[key]) for key in ("train_s", "evaluate_s", "checkpoint_s", "other_s"))
    return [
        Row(
            name,
            "images/s, whole epoch (train + val images)",
            fmt(r["epoch_all_img_s"]),
            fmt(r["bare_img_s"]),
            x(r["ratio"]),
            ">= 0.9",
            verdict(r["ratio"] >= 0.9),
            f"baseline: bare forward/backward/step on a random batch; {what}",
        ),
        Row(
            name,
            "train images/s over whole-epoch wall time",
            fmt(r["epoch_train_img_s"]),
            fmt(r["bare_img_s"]),
            x(r["ratio_train_only"]),
            "",
            "",
            "evaluation and checkpoint counted as cost, not as images",
        ),
        Row(
            name,
            "train phase alone, images/s",
            fmt(r["train_phase_img_s"]),
            fmt(r["bare_img_s"]),
            x(r["ratio_train_phase"]),
            "",
            "",
            "Learner.train_epoch: batches + augmentation + step (what the input path costs the step)",
        ),
        Row(
            name,
            "epoch s: train / evaluate / checkpoint / other",
            parts,
            "",
            "",
            "",
            "",
            f"checkpoint {fmt(r['checkpoint_mb'])} MB per epoch (model + AdamW state)",
        ),
    ]


def orchestration_rows(r: dict, device: str) -> list[Row]:
    name = "orchestration"
    optuna = r["optuna"]
    what = f"{r['trials']} trials x {r['epochs']} epochs, {r['seconds_per_epoch']:g} s of work per epoch"
    rows = []
    for key in sorted(k for k in r if k.startswith("ray_mc")):
        ray = r[key]
        mc = ray["max_concurrent"]
        tag = f"max_concurrent {mc}"
        like = mc == 1
        rows += [
            Row(
                name,
                f"wall s ({tag})",
                fmt(ray["wall_s"]),
                fmt(optuna["wall_s"]) if like else "",
                x(ray["wall_s"] / optuna["wall_s"]) if like else "",
                "",
                "",
                "project: make_tuner + MLflow + PruneAwareOptunaSearch + ASHA; "
                f"baseline: in-process optuna.optimize; {what}",
            ),
            Row(
                name,
                f"sum of trials' own s ({tag})",
                fmt(ray["own_s"]),
                fmt(optuna["own_s"]) if like else "",
                "",
                "",
                "",
                f"{ray['epochs_run']} epochs ran in Ray (ASHA pruned {ray['pruned']}), "
                f"{optuna['epochs_run']} in the loop",
            ),
            Row(
                name,
                f"wall / own ({tag})",
                x(ray["wall_s"] / ray["own_s"]),
                x(optuna["wall_s"] / optuna["own_s"]) if like else "",
                "",
                "",
                "",
                "",
            ),
            Row(
                name,
                f"start-up s, launch -> first trial ({tag})",
                fmt(ray["startup_s"]),
                "",
                "",
                "",
                "",
                f"MLflow parent run {fmt(ray['parent_run_s'])} s, ray.init {fmt(ray['ray_init_s'])} s; "
                f"shutdown after: {fmt(ray['teardown_s'])} s",
            ),
            Row(
                name,
                f"overhead per trial after start-up, s ({tag})",
                fmt(ray["overhead_per_trial_s"]),
                fmt(optuna["overhead_per_trial_s"]) if like else "",
                "",
                "<= 1 s",
                verdict(ray["overhead_per_trial_s"] <= 1),
                f"{fmt(ray['overhead_per_epoch_s'])} s per reported epoch; {ray['mlflow_children']} MLflow child runs",
            ),
        ]
    return rows


def cuda_rows(r: dict, device: str) -> list[Row]:
    name = "cuda memory"
    if "skipped" in r:
        return [Row(name, "peak of one training step", f"skipped ({r['skipped']})")]
    rows = [
        Row(
            name,
            "--gpus-per-trial auto: probe in a spawned process, s",
            fmt(r["subprocess_probe_s"]),
            "",
            "",
            "",
            "",
            "hybrid, batch 32, 224 px: what `auto` adds to a study's start-up",
        )
    ]
    for key, value in r["plans"].items():
        model, batch = key.split("_b")
        if "error" in value:
            rows.append(Row(name, f"{model} batch {batch}, peak", "does not fit", notes=value["error"]))
            continue

        def plan(p: dict) -> str:
            return "does not fit" if p["fraction"] is None else f"{p['fraction']:g} x {p['trials']}"

        rows.append(
            Row(
                name,
                f"{model} batch {batch}, 224 px: peak GiB allocated / reserved (what `auto` plans with)",
                f"{value['allocated_bytes'] / 2**30:.2f} / {value['reserved_bytes'] / 2**30:.2f}",
                "",
                "",
                "",
                "",
                f"--gpus-per-trial auto: {plan(value['here'])} trials on {r['gpu']}; "
                f"{plan(value['reference'])} on an 8 GB card (7.6 GiB free)",
            )
        )
    return rows


def speed_rows(r: dict, device: str) -> list[Row]:
    name = "cuda speed flags"
    if "skipped" in r:
        return [Row(name, "bare training step", f"skipped ({r['skipped']})")]
    rows = []
    labels = {
        "fp32": "fp32",
        "amp": "AMP fp16",
        "amp_channels_last": "AMP + channels_last (default)",
        "compile": "AMP + channels_last + torch.compile",
    }
    for model in MODELS:
        fp32 = r.get(f"{model}.fp32", {})
        for variant, label in labels.items():
            value = r.get(f"{model}.{variant}")
            if value is None:
                continue
            label = f"{model} {label}: images/s"
            if "error" in value:
                rows.append(Row(name, label, "FAILED", notes=value["error"]))
                continue
            speedup = x(value["img_s"] / fp32["img_s"]) if "img_s" in fp32 and variant != "fp32" else ""
            notes = f"{fmt(value['step_ms'])} ms/step, peak {value['peak_gib']:.2f} GiB"
            if variant == "compile":
                notes += f"; compile time (first 3 steps less 3 steady ones) {fmt(value['warmup_extra_s'])} s"
            rows.append(
                Row(
                    name,
                    label,
                    fmt(value["img_s"]),
                    fmt(fp32.get("img_s")) if speedup else "",
                    speedup,
                    "",
                    "",
                    f"vs fp32; batch {r['batch']}, {r['img_size']} px; {notes}",
                )
            )
    return rows


if __name__ == "__main__":
    sys.exit(main())
