"""What a person reads after compare.py: a terminal table and a Markdown report (the plots: plots.py).

Everything here renders a `Comparison` that is already computed (see results.py), so the
report can be checked on one built by hand, without torch, the test images or MLflow.
Numbers are written by search.evaluation.formatting, the sentence on a pair by
stats.describe_pair, so the table, the page and the recommendation say the same thing
the same way. The table and the Markdown need numpy, scipy and scikit-learn: no torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from search.comparison.results import LATENCY_BATCHES, Comparison, ModelResult
from search.comparison.stats import describe_pair, versus, winner_first
from search.evaluation.formatting import NA, bounds, ci, finite, fixed, ms, p_text, p_value, percent, points, ratio
from search.evaluation.intervals import COMPARED_METRICS, CONFIDENCE, Interval
from search.evaluation.paired import SIGNIFICANCE, PairedTest
from search.study.report import duration

PLOT_FILES = ("accuracy.png", "accuracy_vs_latency.png", "confusion_matrices.png")
"""The plots write_plots draws, in reading order; the Markdown links them by these names."""
PERCENT_METRICS = frozenset({"test_acc", "test_balanced_acc", "test_macro_f1"})
"""Metrics read as a share of images (shown in percent); the others (ROC-AUC, ECE) keep their 0-1 scale."""
NONE = "-"
"""A cost that does not apply: peak CUDA memory on the CPU, the search of the reference."""
GIB = 1024**3
MIB = 1024**2
MAX_LABELLED_CLASSES = 20
"""Above this many classes the confusion panels drop their class names (they would overlap)."""


# ---------------------------------------------------------------- numbers as text


def percent_interval(interval: Interval) -> str:
    """'91.2 % [88.0, 94.1]': a share of images in percent, with its 95 % interval."""
    if not finite(interval.value):
        return NA
    spread = bounds(interval)
    return percent(interval.value) if spread == NA else f"{percent(interval.value)} {spread}"


def score_interval(interval: Interval) -> str:
    """'0.973 [0.951, 0.990]': a 0-1 score (bounds as precise as the value: a bound rounded shorter could
    read as excluding it)."""
    if not finite(interval.value):
        return NA
    text = fixed(interval.value, 3)
    if finite(interval.low) and finite(interval.high):
        text += f" [{fixed(interval.low, 3)}, {fixed(interval.high, 3)}]"
    return text


def metric_text(model: ModelResult, key: str) -> str:
    """A model's metric as the terminal table shows it; a metric the model lacks reads n/a."""
    interval = model.metrics.get(key)
    if interval is None:
        return NA
    return percent_interval(interval) if key in PERCENT_METRICS else score_interval(interval)


def metric_markdown(model: ModelResult, key: str) -> str:
    """'91.2 (88.0–94.1)' in percent, or '0.973 (0.950–0.990)': the Markdown has room for a third digit."""
    interval = model.metrics.get(key)
    if interval is None or not finite(interval.value):
        return NA
    scale, digits = (100.0, 1) if key in PERCENT_METRICS else (1.0, 3)
    text = fixed(scale * interval.value, digits)
    if finite(interval.low) and finite(interval.high):
        text += f" ({fixed(scale * interval.low, digits)}–{fixed(scale * interval.high, digits)})"
    return text


def parameters_text(count: int) -> str:
    """'20.2 M', '850 k': a parameter count to the precision one compares models at."""
    if count >= 1_000_000:
        return f"{count / 1_000_000:.1f} M"
    if count >= 1_000:
        return f"{count / 1_000:.0f} k"
    return str(count)


def plain_number(x: float) -> str:
    """Three significant digits without scientific notation: '0.412', '3.21', '41.2', '1234'."""
    if not finite(x):
        return NA
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    if abs(x) >= 1:
        return f"{x:.2f}"
    return f"{x:.3f}"


def latency_text(model: ModelResult, batch: int) -> str:
    """Milliseconds as the recommendation writes them, so the table and the sentence agree."""
    latency = model.costs.latency_ms.get(batch)
    return NA if latency is None else ms(latency)


def memory_text(peak: int | None) -> str:
    """'1.9 GiB', '512 MiB', or '-' where nothing was measured (training on the CPU)."""
    if peak is None:
        return NONE
    return f"{peak / GIB:.1f} GiB" if peak >= GIB else f"{peak / MIB:.0f} MiB"


def duration_text(seconds: float) -> str:
    """'2 h 14 min 05 s', '3 min 05 s', '41 s' (as a study's closing line says it); n/a when not measured."""
    return duration(seconds) if finite(seconds) else NA


def search_time_text(model: ModelResult) -> str:
    return NONE if model.search is None else duration_text(model.search.wall_seconds)


def gpu_hours_text(model: ModelResult) -> str:
    """'0.52'; '-' for no search or a search that used no GPU; '<0.01' so a short GPU search is not read as none."""
    if model.search is None:
        return NONE
    hours = model.search.gpu_hours
    if not finite(hours):
        return NA
    if hours <= 0:
        return NONE
    return "<0.01" if hours < 0.005 else f"{hours:.2f}"


def trials_text(model: ModelResult) -> str:
    return NONE if model.search is None else str(model.search.trials)


def compute_texts(model: ModelResult) -> tuple[str, str]:
    """The search's compute: '41.5' full-resolution epochs and '2.8' recipe trainings; '-' for no search, n/a for
    a study that predates the count."""
    if model.search is None:
        return NONE, NONE
    epochs, ratio = model.search.compute_epochs, model.search.compute_vs_recipe
    return (f"{epochs:.1f}" if finite(epochs) else NA), (f"{ratio:.1f}" if finite(ratio) else NA)


def signed_points(interval: Interval) -> str:
    """'+1.3 [-0.4, 3.0]': a difference of accuracies in percentage points, signed, with its interval."""
    if not finite(interval.value):
        return NA
    spread = bounds(interval)
    return points(interval.value, sign=True) if spread == NA else f"{points(interval.value, sign=True)} {spread}"


def significance(pair: PairedTest) -> str:
    """'significant', 'not significant', or 'not tested' where McNemar's p is missing (a hand-built pair)."""
    if not finite(pair.p_value):
        return "not tested"
    return "significant" if pair.significant else "not significant"


def yes_no(pair: PairedTest) -> str:
    """significance() as a table cell."""
    return {"significant": "yes", "not significant": "no"}.get(significance(pair), "not tested")


def shown(value: Any) -> str:
    """A setting or knob as text: floats to four significant digits, lists joined, dicts as k=v."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return NA if math.isnan(value) else f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{key}={shown(item)}" for key, item in value.items())
    if isinstance(value, list | tuple):
        return ", ".join(shown(item) for item in value)
    return str(value)


def display_name(model: ModelResult) -> str:
    return f"{model.name} (reference)" if model.reference else model.name


def ordered(comparison: Comparison) -> list[ModelResult]:
    """The lightweight models in their order, the reference(s) last, whatever order the caller built."""
    return [model for model in comparison.models if not model.reference] + [
        model for model in comparison.models if model.reference
    ]


# ---------------------------------------------------------------- the Pareto front


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices (ascending) of the (latency, accuracy) points no other point beats: as fast or faster
    and as accurate or more, strictly better in one. Two equal points do not beat each other, so both
    stay; a point with a NaN coordinate is neither on the front nor beats any (it was not measured).
    """
    measured = [i for i, (latency, accuracy) in enumerate(points) if finite(latency) and finite(accuracy)]

    def beats(j: int, i: int) -> bool:
        (lat_j, acc_j), (lat_i, acc_i) = points[j], points[i]
        return lat_j <= lat_i and acc_j >= acc_i and (lat_j < lat_i or acc_j > acc_i)

    return [i for i in measured if not any(beats(j, i) for j in measured if j != i)]


def latency_accuracy(model: ModelResult) -> tuple[float, float]:
    """A model's point for the front: latency at batch 1 (ms) and test accuracy; NaN where not measured."""
    accuracy = model.metrics.get("test_acc")
    return (
        model.costs.latency_ms.get(1, math.nan),
        accuracy.value if accuracy is not None else math.nan,
    )


def front_names(models: Sequence[ModelResult]) -> set[str]:
    return {models[i].name for i in pareto_front([latency_accuracy(model) for model in models])}


def front_text(model: ModelResult, front: set[str]) -> str:
    if not all(finite(x) for x in latency_accuracy(model)):
        return NONE
    return "yes" if model.name in front else "no"


# ---------------------------------------------------------------- the terminal table

SCORE_HEADERS = {
    "test_acc": "accuracy",
    "test_balanced_acc": "balanced acc",
    "test_macro_f1": "macro-F1",
    "test_roc_auc": "ROC-AUC",
    "test_ece": "ECE (lower better)",
}
"""Short column names for the terminal, where the table has to fit ~160 columns."""
COST_HEADERS = (
    "model",
    "params",
    "device",
    "train img/s",
    "ms @1",
    "ms @32",
    "peak train mem",
    "search time",
    "GPU-h",
    "trials",
    "compute",
    "x recipe",
    "front",
)


def aligned(rows: Sequence[Sequence[str]]) -> list[str]:
    """Rows of cells as text columns: the first (model) column left-aligned, the numbers right-aligned,
    every line the same width, a rule under the header row."""
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]

    def line(row: Sequence[str]) -> str:
        cells = [row[0].ljust(widths[0])] + [text.rjust(width) for text, width in zip(row[1:], widths[1:], strict=True)]
        return "  ".join(cells)

    rule = "  ".join("-" * width for width in widths)
    return [line(rows[0]), rule, *(line(row) for row in rows[1:])]


def score_rows(comparison: Comparison) -> list[list[str]]:
    keys = list(COMPARED_METRICS)
    header = ["model", *(SCORE_HEADERS.get(key, COMPARED_METRICS[key]) for key in keys)]
    return [
        header,
        *([display_name(model), *(metric_text(model, key) for key in keys)] for model in ordered(comparison)),
    ]


def cost_rows(comparison: Comparison) -> list[list[str]]:
    models = ordered(comparison)
    front = front_names(models)
    rows = [list(COST_HEADERS)]
    for model in models:
        rows.append(
            [
                display_name(model),
                parameters_text(model.costs.parameters),
                model.costs.device,
                plain_number(model.costs.train_images_per_s),
                *(latency_text(model, batch) for batch in LATENCY_BATCHES),
                memory_text(model.costs.peak_train_memory),
                search_time_text(model),
                gpu_hours_text(model),
                trials_text(model),
                *compute_texts(model),
                front_text(model, front),
            ]
        )
    return rows


def pair_line(pair: PairedTest) -> str:
    """stats.describe_pair's sentence, then the images McNemar weighs, winner first as in the sentence:
    'hybrid beats cnn by 1.3 points, 95 % CI [-0.4, 3.0], p = 0.21: not a significant difference
    (4 vs 2 images only one of them gets right)'.
    """
    won = winner_first(pair)
    return f"{describe_pair(pair)} ({won.a_only} vs {won.b_only} images only one of them gets right)"


def table_lines(comparison: Comparison) -> list[str]:
    """The report for the terminal: a scores table, a costs table, the paired tests, the models against the
    reference and the recommendation.

    Two stacked tables rather than one wide one, so that it reads in ~160 columns; blank lines
    separate the parts.
    """
    lines = [
        f"{comparison.name}: test scores on {comparison.test_images} images, {len(comparison.classes)} classes "
        f"(95 % bootstrap intervals, {comparison.resamples} resamples)",
        *aligned(score_rows(comparison)),
        "",
        "Costs (ms @N: median inference latency per batch of N; front: on the accuracy/latency Pareto front)",
        *aligned(cost_rows(comparison)),
    ]
    pairs = lightweight_pairs(comparison)
    if pairs:
        lines += [
            "",
            f"Paired tests (accuracy difference; McNemar's exact test, significant below p = {SIGNIFICANCE:g})",
        ]
        lines += [f"  {pair_line(pair)}" for pair in pairs]
    for reference in references(comparison):
        lines += ["", reference_title(reference)]
        for model in lightweight(comparison):
            first, *rest = reference_lines(model, reference, comparison.pairs)
            lines += [f"  {first}", *(f"  {' ' * len(model.name)}  {line}" for line in rest)]
    for model in ensembles(comparison):
        lines += ["", ensemble_title(model), *(f"  {line}" for line in ensemble_lines(comparison, model))]
    lines += ["", f"Recommendation: {comparison.recommendation}"]
    return lines


# ---------------------------------------------------------------- against the reference

SEED_ACCURACY = (0.85, 0.92)
"""The seed document's claim: the lightweight models reach 85-92 % test accuracy."""
SEED_SPEEDUP = (3.0, 5.0)
"""...and train 3-5x faster than large models, which the reference stands for."""
REACHES = {"below": "below it", "within": "into it", "above": "above it"}
"""Where an interval's bound lies, as the clause that says its interval reaches there."""


def references(comparison: Comparison) -> list[ModelResult]:
    """The reference (compare.py trains at most one); a list so that a hand-built second one is shown, not lost."""
    return [model for model in comparison.models if model.reference]


def lightweight(comparison: Comparison) -> list[ModelResult]:
    """The models the seed's claims are about: every one but the reference, in the comparison's order."""
    return [model for model in comparison.models if not model.reference]


def lightweight_pairs(comparison: Comparison) -> list[PairedTest]:
    """The pairs of lightweight models: those with the reference get their own section, from the lightweight side."""
    named = {model.name for model in references(comparison)}
    return [pair for pair in comparison.pairs if pair.a not in named and pair.b not in named]


def claim_range(low: float, high: float, scale: float = 1.0, unit: str = "") -> str:
    """'85-92 %', '3-5x': a claimed range as the seed writes it."""
    return f"{scale * low:g}-{scale * high:g}{unit}"


def seed_accuracy_text() -> str:
    """'85-92 %', written from SEED_ACCURACY so the text cannot drift from the range tested."""
    return claim_range(*SEED_ACCURACY, scale=100, unit=" %")


def seed_speedup_text() -> str:
    """'3-5x', written from SEED_SPEEDUP."""
    return claim_range(*SEED_SPEEDUP, unit="x")


def reference_title(reference: ModelResult) -> str:
    """The section's heading: which model the lightweight ones are held against, and what the seed claims."""
    return (
        f"Against the reference {reference.name} (the seed claims {seed_accuracy_text()} accuracy, "
        f"training {seed_speedup_text()} faster than large models)"
    )


def side(x: float, low: float, high: float) -> str:
    """'below', 'within' or 'above' the range [low, high]; 'n/a' for a number not measured."""
    if not finite(x):
        return NA
    return "below" if x < low else "above" if x > high else "within"


def accuracy_claim(accuracy: Interval | None) -> str:
    """Where a test accuracy lies against the seed's 85-92 %: its point estimate, and whether its interval
    says more ('within the seed's 85-92 %, though its interval reaches above it'): a point inside the range
    with an interval reaching out of it does not confirm the claim as firmly as a whole interval inside."""
    where = side(accuracy.value, *SEED_ACCURACY) if accuracy is not None else NA
    if accuracy is None or where == NA:
        return f"no test accuracy to hold against the seed's {seed_accuracy_text()}"
    claim = f"{where} the seed's {seed_accuracy_text()}"
    if not (finite(accuracy.low) and finite(accuracy.high)):
        return claim
    ends = dict.fromkeys(side(bound, *SEED_ACCURACY) for bound in (accuracy.low, accuracy.high))
    reaches = [REACHES[end] for end in ends if end != where]
    return (
        f"{claim}, though its interval reaches {' and '.join(reaches)}"
        if reaches
        else f"{claim}, its whole interval too"
    )


def training_speedup(model: ModelResult, reference: ModelResult) -> float:
    """Training images/s of the model over the reference's (NaN where either was not measured)."""
    own, theirs = model.costs.train_images_per_s, reference.costs.train_images_per_s
    return own / theirs if finite(own) and finite(theirs) and theirs > 0 else math.nan


def speed_text(model: ModelResult, reference: ModelResult) -> str:
    """'trains 3.4x as fast (812 vs 240 images/s), within the seed's 3-5x'."""
    speedup = training_speedup(model, reference)
    if not finite(speedup):
        return "training throughput not measured"
    images = f"{plain_number(model.costs.train_images_per_s)} vs {plain_number(reference.costs.train_images_per_s)}"
    return (
        f"trains {ratio(speedup)} as fast ({images} images/s), "
        f"{side(speedup, *SEED_SPEEDUP)} the seed's {seed_speedup_text()}"
    )


def speedup_cell(model: ModelResult, reference: ModelResult) -> str:
    """'3.4x (within)': the Markdown's throughput ratio, the images/s being in the column beside it."""
    speedup = training_speedup(model, reference)
    return NA if not finite(speedup) else f"{ratio(speedup)} ({side(speedup, *SEED_SPEEDUP)})"


def against_reference(model: ModelResult, reference: ModelResult, pairs: list[PairedTest]) -> PairedTest | None:
    """Their paired test as model minus reference (the reference's pairs are stored reference first)."""
    try:
        difference, pair = versus(pairs, model.name, reference.name)
    except ValueError:
        return None
    return replace(pair, a=model.name, b=reference.name, difference=difference) if pair.a != model.name else pair


def difference_text(model: ModelResult, reference: ModelResult, pairs: list[PairedTest]) -> str:
    """'-2.1 points vs convnext_tiny, 95 % CI [-5.0, 0.8], p = 0.16 (not significant)', from the model's side."""
    pair = against_reference(model, reference, pairs)
    if pair is None:
        return f"no paired test against {reference.name}"
    return (
        f"{points(pair.difference.value, sign=True)} points vs {reference.name}, "
        f"{ci(pair.difference, CONFIDENCE)}, {p_text(pair.p_value)} ({significance(pair)})"
    )


def reference_lines(model: ModelResult, reference: ModelResult, pairs: list[PairedTest]) -> list[str]:
    """One lightweight model against the reference and the seed's claims, as three short lines (a terminal's
    width): the accuracy difference, the training speed, the accuracy against the seed's range."""
    accuracy = model.metrics.get("test_acc")
    shown_accuracy = NA if accuracy is None else percent_interval(accuracy)
    return [
        f"{model.name}: {difference_text(model, reference, pairs)}",
        speed_text(model, reference),
        f"test accuracy {shown_accuracy}, {accuracy_claim(accuracy)}",
    ]


# ---------------------------------------------------------------- an ensemble beside its single model


def ensembles(comparison: Comparison) -> list[ModelResult]:
    """The ensembles compared (compare.py --ensemble sets one beside the single models)."""
    return [model for model in comparison.models if model.ensemble is not None]


def single_of(comparison: Comparison, ensemble: ModelResult) -> ModelResult | None:
    """The single model whose study gave the ensemble's members; None where it is not compared."""
    assert ensemble.ensemble is not None
    return next((model for model in comparison.models if model.name == ensemble.ensemble.of), None)


def ensemble_title(model: ModelResult) -> str:
    """'Ensemble vit-ensemble3: the 3 best configurations of study cmp-vit (t03, t07, t01), ...'."""
    assert model.ensemble is not None
    members = model.ensemble.members
    return (
        f"Ensemble {model.name}: the {len(members)} best configurations of study {model.study} "
        f"({', '.join(members)}), each retrained, their calibrated probabilities averaged"
    )


def training_compute(model: ModelResult) -> float:
    """Recipe trainings in all: the retrain's (every member's) plus the search's; NaN where either is unknown."""
    search = model.search.compute_vs_recipe if model.search is not None else math.nan
    return model.retrain_vs_recipe + search


def recipe_trainings(x: float) -> str:
    """'13.3': recipe trainings to one decimal, as the costs table's 'x recipe' column writes them."""
    return f"{x:.1f}" if finite(x) else NA


def compute_text(model: ModelResult) -> str:
    """'13.3 recipe trainings (retrain 3.0 + search 10.3)'."""
    search = model.search.compute_vs_recipe if model.search is not None else math.nan
    return (
        f"{recipe_trainings(training_compute(model))} recipe trainings "
        f"(retrain {recipe_trainings(model.retrain_vs_recipe)} + search {recipe_trainings(search)})"
    )


def times(x: float, y: float) -> str:
    """x over y as '2.9x'; n/a where either was not measured."""
    return ratio(x / y) if finite(x) and finite(y) and y > 0 else NA


def ensemble_lines(comparison: Comparison, model: ModelResult) -> list[str]:
    """The ensemble against its single model, from the ensemble's side: the paired test, then what it costs
    (forward passes, parameters, latency at batch 1, training compute in recipe trainings)."""
    assert model.ensemble is not None
    single = single_of(comparison, model)
    passes = f"{model.ensemble.forward_passes} forward passes per image"
    latency = model.costs.latency_ms.get(1, math.nan)
    if single is None:
        return [
            f"{model.name}: {passes}, {parameters_text(model.costs.parameters)} parameters, {ms(latency)} ms per "
            f"image, training compute {compute_text(model)}"
        ]
    single_latency = single.costs.latency_ms.get(1, math.nan)
    return [
        f"{model.name}: {difference_text(model, single, comparison.pairs)}",
        f"{passes}: {times(model.costs.parameters, single.costs.parameters)} {single.name}'s parameters "
        f"({parameters_text(model.costs.parameters)}), {times(latency, single_latency)} its latency "
        f"({ms(latency)} vs {ms(single_latency)} ms per image)",
        f"training compute {compute_text(model)} vs {single.name}'s {compute_text(single)}",
    ]


def markdown_ensemble_rows(comparison: Comparison, model: ModelResult) -> list[list[str]]:
    """The single model and its ensemble, side by side: scores, the paired test, and the costs."""
    assert model.ensemble is not None
    single = single_of(comparison, model)
    rows = [
        [
            "model",
            "members",
            "forward passes per image",
            "accuracy (%)",
            "ECE",
            f"accuracy vs {single.name if single else 'the single model'} (points, 95 % CI)",
            "McNemar p",
            "parameters",
            "latency batch 1 (ms)",
            "retrain compute (recipe trainings)",
            "search compute (recipe trainings)",
            "training compute in all (recipe trainings)",
        ]
    ]
    for shown_model in ([single] if single else []) + [model]:
        pair = against_reference(shown_model, single, comparison.pairs) if single and shown_model is model else None
        search = shown_model.search.compute_vs_recipe if shown_model.search is not None else math.nan
        facts = shown_model.ensemble
        rows.append(
            [
                shown_model.name,
                ", ".join(facts.members) if facts else "1",
                str(facts.forward_passes) if facts else "1",
                metric_markdown(shown_model, "test_acc"),
                metric_markdown(shown_model, "test_ece"),
                NONE if pair is None else signed_points(pair.difference),
                NONE if pair is None else p_value(pair.p_value),
                parameters_text(shown_model.costs.parameters),
                latency_text(shown_model, 1),
                recipe_trainings(shown_model.retrain_vs_recipe),
                recipe_trainings(search),
                recipe_trainings(training_compute(shown_model)),
            ]
        )
    return rows


# ---------------------------------------------------------------- the Markdown report


def cell(text: str) -> str:
    return text.replace("|", "\\|")


def markdown_table(rows: Sequence[Sequence[str]]) -> list[str]:
    header, *body = rows
    return [
        "| " + " | ".join(cell(text) for text in header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
        *("| " + " | ".join(cell(text) for text in row) + " |" for row in body),
    ]


def settings_lines(comparison: Comparison) -> list[str]:
    """The shared facts first (they come with the comparison), then every setting the caller recorded."""
    classes = comparison.classes
    named = ", ".join(classes[:MAX_LABELLED_CLASSES]) + (", …" if len(classes) > MAX_LABELLED_CLASSES else "")
    lines = [
        f"- **classes**: {len(classes)} ({named})",
        f"- **test images**: {comparison.test_images}",
        f"- **bootstrap resamples**: {comparison.resamples}",
    ]
    lines += [f"- **{key}**: {shown(value)}" for key, value in comparison.settings.items()]
    return lines


def markdown_score_rows(comparison: Comparison) -> list[list[str]]:
    keys = list(COMPARED_METRICS)
    header = ["model"]
    for key in keys:
        name = COMPARED_METRICS[key]
        unit = " (%)" if key in PERCENT_METRICS else ""
        header.append(f"{name}{unit}" + (", lower is better" if key == "test_ece" else ""))
    return [
        header,
        *([display_name(model), *(metric_markdown(model, key) for key in keys)] for model in ordered(comparison)),
    ]


def markdown_cost_rows(comparison: Comparison) -> list[list[str]]:
    rows = cost_rows(comparison)
    rows[0] = [
        "model",
        "parameters",
        "device",
        "train images/s",
        *(f"latency batch {batch} (ms)" for batch in LATENCY_BATCHES),
        "peak train memory",
        "search wall time",
        "GPU-hours",
        "trials",
        "search compute (full-resolution epochs)",
        "search compute (recipe trainings)",
        "Pareto front",
    ]
    return rows


def markdown_pair_rows(comparison: Comparison) -> list[list[str]]:
    rows = [
        ["pair", "accuracy difference (points, 95 % CI)", "only a right", "only b right", "McNemar p", "significant"]
    ]
    for pair in lightweight_pairs(comparison):
        rows.append(
            [
                f"{pair.a} vs {pair.b}",
                signed_points(pair.difference),
                str(pair.a_only),
                str(pair.b_only),
                p_value(pair.p_value),
                yes_no(pair),
            ]
        )
    return rows


def markdown_reference_rows(comparison: Comparison, reference: ModelResult) -> list[list[str]]:
    """One row per lightweight model, as reference_line says it: from the model's side, against the seed."""
    rows = [
        [
            "model",
            f"accuracy vs {reference.name} (points, 95 % CI)",
            "McNemar p",
            "significant",
            f"train images/s ({reference.name}: {plain_number(reference.costs.train_images_per_s)})",
            f"training speed vs reference (seed: {seed_speedup_text()})",
            "test accuracy (%)",
            f"against the seed's {seed_accuracy_text()}",
        ]
    ]
    for model in lightweight(comparison):
        pair = against_reference(model, reference, comparison.pairs)
        rows.append(
            [
                model.name,
                NA if pair is None else signed_points(pair.difference),
                NA if pair is None else p_value(pair.p_value),
                "not tested" if pair is None else yes_no(pair),
                plain_number(model.costs.train_images_per_s),
                speedup_cell(model, reference),
                metric_markdown(model, "test_acc"),
                accuracy_claim(model.metrics.get("test_acc")),
            ]
        )
    return rows


def config_lines(comparison: Comparison) -> list[str]:
    """Each model's winning knobs as one compact line, with where it came from (study, final run)."""
    lines = []
    for model in ordered(comparison):
        origin = [f"study `{model.study}`"] if model.study else []
        origin.append(f"final run `{model.final_run_id}`")
        knobs = ", ".join(f"{key}={shown(value)}" for key, value in model.config.items())
        if model.ensemble is not None:  # its members' knobs are their trials' (each on its own run)
            knobs = f"an ensemble of the study's trials {', '.join(model.ensemble.members)}"
        elif not knobs:
            knobs = "defaults" if model.reference else "no knobs recorded"
        elif model.reference:
            knobs = f"defaults: {knobs}"
        lines.append(f"- **{display_name(model)}** ({', '.join(origin)}): {knobs}")
    return lines


def how_to_read(comparison: Comparison) -> str:
    return (
        "Each score is given with its 95 % interval: a stratified percentile bootstrap over the "
        f"{comparison.test_images} test images ({comparison.resamples} resamples, each keeping every class's count). "
        "Two intervals that overlap do not show that the models are equal, nor do two apart prove a difference: "
        "the models were scored on the same images, and the paired tests compare them image by image. "
        "McNemar's exact test looks only at the images exactly one of the two gets right; a difference is "
        f"called significant when its p is below {SIGNIFICANCE:g}. ECE (expected calibration error) is better "
        "lower; latencies are medians on the device named, so compare them within one device. A model is on the "
        "Pareto front when no other is both faster (batch 1) and more accurate."
    )


def markdown(comparison: Comparison, plots: bool = True) -> str:
    """The comparison as a Markdown page; its plots are linked by file name, so it renders beside them.

    plots=False leaves the links out: for the MLflow run's description, where a relative link finds no file
    (the plots are the run's artifacts, previewed there)."""
    plot_titles = ("Test accuracy with 95 % intervals", "Accuracy against latency", "Confusion matrices")
    parts = [
        f"# Model comparison: {comparison.name}",
        f"**Recommendation: {comparison.recommendation}**",  # the answer first: a collapsed description shows it
        "\n".join(settings_lines(comparison)),
        "## Test scores",
        "\n".join(markdown_table(markdown_score_rows(comparison))),
        "## Costs",
        "\n".join(markdown_table(markdown_cost_rows(comparison))),
    ]
    if lightweight_pairs(comparison):
        parts += ["## Paired tests", "\n".join(markdown_table(markdown_pair_rows(comparison)))]
    for reference in references(comparison):
        parts += [
            f"## {reference_title(reference)}",
            "\n".join(markdown_table(markdown_reference_rows(comparison, reference))),
        ]
    for model in ensembles(comparison):
        parts += [f"## {ensemble_title(model)}", "\n".join(markdown_table(markdown_ensemble_rows(comparison, model)))]
    parts += [
        "## Winning configurations",
        "\n".join(config_lines(comparison)),
        "## How to read this",
        how_to_read(comparison),
    ]
    if plots:
        parts += [
            "## Plots",
            "\n\n".join(f"![{title}]({name})" for title, name in zip(plot_titles, PLOT_FILES, strict=True)),
        ]
    return "\n\n".join(parts) + "\n"
