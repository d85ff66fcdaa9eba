"""The comparison report: the terminal table, the Markdown page, real PNG plots, the Pareto front and the section
against the reference (the number formatters they share: test_evaluation_formatting.py).

A Comparison built by hand stands for compare.py's result: three searched models and a
reference on four classes, one with an undefined ROC-AUC, the reference with no search.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

from search.comparison.plots import row_normalised, write_plots
from search.comparison.report import PLOT_FILES, markdown, pareto_front, table_lines
from search.comparison.results import Comparison, Costs, ModelResult, SearchCost
from search.evaluation.intervals import Interval
from search.evaluation.paired import PairedTest

CLASSES = ["benign", "malignant", "normal", "other"]
REFERENCE = "convnext_tiny.fb_in1k"
RECOMMENDATION = "Pick cnn: within noise of hybrid, and twice as fast."
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def scores(acc: Interval, roc_auc: float = 0.973) -> dict[str, Interval]:
    return {
        "test_acc": acc,
        "test_balanced_acc": Interval(acc.value - 0.01, acc.low - 0.01, acc.high - 0.01),
        "test_macro_f1": Interval(acc.value - 0.02, acc.low - 0.02, acc.high - 0.02),
        "test_roc_auc": Interval(roc_auc, roc_auc - 0.02, roc_auc + 0.01),
        "test_ece": Interval(0.041, 0.02, 0.06),
    }


def confusion(correct: int) -> np.ndarray:
    """4 x 4 counts, `correct` on the diagonal of each 10-image class."""
    matrix = np.full((4, 4), 0)
    for row in range(4):
        matrix[row, row] = correct
        matrix[row, (row + 1) % 4] = 10 - correct
    return matrix


def model(
    name: str,
    acc: Interval,
    latency_1: float,
    parameters: int,
    *,
    reference: bool = False,
    roc_auc: float = 0.973,
    peak: int | None = 2_040_000_000,
    search: SearchCost | None = None,
    device: str = "cuda",
    train_images_per_s: float = 812.4,
) -> ModelResult:
    return ModelResult(
        name=name,
        metrics=scores(acc, roc_auc),
        costs=Costs(
            parameters=parameters,
            device=device,
            train_images_per_s=train_images_per_s,
            latency_ms={1: latency_1, 32: 6 * latency_1},
            peak_train_memory=peak,
        ),
        confusion=confusion(round(10 * acc.value)),
        final_run_id=f"run-{name}",
        study=None if reference else f"{name}-study",
        search=search,
        config={} if reference else {"lr": 0.00031, "batch_size": 64, "augment": "strong"},
        reference=reference,
    )


@pytest.fixture
def comparison() -> Comparison:
    models = [
        model("cnn", Interval(0.912, 0.88, 0.941), 2.1, 4_200_000, search=SearchCost(8040.0, 0.52, 40, 123.4, 8.2)),
        model("vit", Interval(0.887, 0.85, 0.92), 5.3, 5_700_000, search=SearchCost(41.0, 0.01, 3)),
        model("hybrid", Interval(0.925, 0.89, 0.955), 3.9, 20_200_000, roc_auc=math.nan, search=SearchCost(3600, 1, 9)),
        model(REFERENCE, Interval(0.951, 0.92, 0.98), 38.0, 28_600_000, reference=True, train_images_per_s=240.0),
    ]
    pairs = [
        PairedTest("cnn", "vit", Interval(0.025, 0.001, 0.05), 0.031, 9, 3),
        PairedTest("hybrid", "cnn", Interval(0.013, -0.004, 0.030), 0.21, 4, 2),
        PairedTest(REFERENCE, "cnn", Interval(0.039, 0.01, 0.07), 0.0004, 12, 1),
        PairedTest(REFERENCE, "vit", Interval(0.064, 0.03, 0.1), 0.00002, 17, 2),
        PairedTest(REFERENCE, "hybrid", Interval(0.026, -0.008, 0.06), 0.16, 9, 4),
    ]
    settings = {"data": "data/skin", "seed": 7, "img_size": 224, "epochs": 30, "trials": 40}
    return Comparison("skin", CLASSES, 240, models, pairs, RECOMMENDATION, 2000, settings)


def first_table(lines: list[str]) -> list[str]:
    """The scores table: from its header (after the title line) to the first blank line."""
    end = lines.index("")
    return lines[1:end]


def costs_table(lines: list[str]) -> list[str]:
    """The costs table: from its header (after its title line) to the next blank line."""
    start = lines.index("") + 2
    return lines[start : lines.index("", start)]


def row_of(lines: list[str], name: str) -> str:
    (line,) = [line for line in lines if line.startswith(name + " ")]
    return line


# ---------------------------------------------------------------- the terminal table


def test_table_names_every_model_reference_last_and_the_recommendation(comparison: Comparison) -> None:
    lines = table_lines(comparison)
    table = first_table(lines)
    assert [line.split()[0] for line in table[2:]] == ["cnn", "vit", "hybrid", REFERENCE]
    assert f"{REFERENCE} (reference)" in table[-1]
    assert lines[-1] == f"Recommendation: {RECOMMENDATION}"


def test_table_puts_the_reference_last_whatever_the_order_given(comparison: Comparison) -> None:
    shuffled = replace(comparison, models=[comparison.models[3], *comparison.models[:3]])
    assert first_table(table_lines(shuffled))[-1].startswith(f"{REFERENCE} (reference)")


def test_table_formats_intervals_and_nan(comparison: Comparison) -> None:
    table = first_table(table_lines(comparison))
    cnn = row_of(table, "cnn")
    assert "91.2 % [88.0, 94.1]" in cnn
    assert "0.973 [0.953, 0.983]" in cnn  # ROC-AUC: value and bounds to 3 digits
    assert "0.041 [0.020, 0.060]" in cnn  # ECE likewise: a bound rounded shorter could read as excluding it
    assert "n/a" in row_of(table, "hybrid")  # its ROC-AUC is NaN
    assert all("n/a" not in row_of(table, name) for name in ("cnn", "vit", REFERENCE))
    assert "nan" not in "\n".join(table_lines(comparison)).lower()
    unscored = replace(
        comparison.models[0], metrics={**comparison.models[0].metrics, "test_acc": Interval(*[math.nan] * 3)}
    )
    lines = table_lines(replace(comparison, models=[unscored, *comparison.models[1:]]))
    cells = [cell.strip() for cell in row_of(first_table(lines), "cnn").split("  ") if cell.strip()]
    assert cells[1] == "n/a"


def test_table_columns_are_aligned_and_fit(comparison: Comparison) -> None:
    lines = table_lines(comparison)
    scores_table = first_table(lines)
    assert len(scores_table) == 2 + len(comparison.models)
    assert len({len(line) for line in scores_table}) == 1
    assert set(scores_table[1]) == {"-", " "}  # the rule under the header
    # Right-aligned numbers: each row's accuracy interval ends in the same column as the header's name.
    ends = {line.index("]") for line in scores_table[2:]}
    assert len(ends) == 1
    header, hybrid = scores_table[0], row_of(scores_table, "hybrid")
    assert hybrid.index("n/a") + len("n/a") == header.index("ROC-AUC") + len("ROC-AUC")
    costs = costs_table(lines)
    assert len(costs) == 2 + len(comparison.models)
    assert len({len(line) for line in costs}) == 1
    assert max(len(line) for line in scores_table + costs) <= 160


def test_table_costs(comparison: Comparison) -> None:
    costs = costs_table(table_lines(comparison))
    cnn, vit, hybrid = (row_of(costs, name).split("  ") for name in ("cnn", "vit", "hybrid"))
    cnn_cells = [cell.strip() for cell in cnn if cell.strip()]
    expected = ["cnn", "4.2 M", "cuda", "812", "2.1", "12.6", "1.9 GiB", "2 h 14 min 00 s", "0.52", "40"]
    expected += ["123.4", "8.2", "yes"]  # the search's compute: full-resolution epochs, recipe trainings
    assert cnn_cells == expected
    vit_cells = [cell.strip() for cell in vit if cell.strip()]
    assert vit_cells[7:12] == ["41 s", "0.01", "3", "n/a", "n/a"]  # a study that predates the compute count
    assert vit_cells[-1] == "no"  # slower than cnn and hybrid, and less accurate than both
    assert [cell.strip() for cell in hybrid if cell.strip()][1] == "20.2 M"
    small = replace(comparison.models[0], costs=replace(comparison.models[0].costs, peak_train_memory=512 * 1024**2))
    assert "512 MiB" in row_of(costs_table(table_lines(replace(comparison, models=[small]))), "cnn")
    reference_cells = row_of(costs, REFERENCE).split()
    assert reference_cells[-4:] == ["-", "-", "-", "yes"]  # no search; on the front as the most accurate


def paired_section(lines: list[str]) -> list[str]:
    """The paired tests' lines, indented under their title, up to the next blank line."""
    start = next(i for i, line in enumerate(lines) if line.startswith("Paired tests")) + 1
    return lines[start : lines.index("", start)]


def reference_section(lines: list[str]) -> list[str]:
    """The title 'Against the reference ...' and one entry per model, up to the next blank line: a model's
    continuation lines (indented deeper, under its text) joined to its first with '; '."""
    start = next(i for i, line in enumerate(lines) if line.startswith("Against the reference"))
    entries: list[str] = []
    for line in lines[start : lines.index("", start)]:
        if line.startswith("   ") and entries:
            entries[-1] += "; " + line.strip()
        else:
            entries.append(line)
    return entries


def test_table_pair_lines_read_as_describe_pair_with_the_counts_winner_first(comparison: Comparison) -> None:
    pairs = paired_section(table_lines(comparison))
    assert pairs == [
        "  cnn beats vit by 2.5 points, 95 % CI [0.1, 5.0], p = 0.031: significant "
        "(9 vs 3 images only one of them gets right)",
        "  hybrid beats cnn by 1.3 points, 95 % CI [-0.4, 3.0], p = 0.21: not a significant difference "
        "(4 vs 2 images only one of them gets right)",
    ]
    stored_loser_first = PairedTest("cnn", "hybrid", Interval(-0.013, -0.030, 0.004), 0.21, 2, 4)
    assert paired_section(table_lines(replace(comparison, pairs=[stored_loser_first]))) == [pairs[1]]


def test_table_shows_a_tiny_difference_and_never_minus_zero(comparison: Comparison) -> None:
    tiny = PairedTest("vit", "cnn", Interval(-0.0004, -0.0003, 0.02), 1.0, 3, 3)
    zero_bound = PairedTest("hybrid", "vit", Interval(-0.01, -0.02, 0.0), 0.5, 1, 3)
    lines = paired_section(table_lines(replace(comparison, pairs=[tiny, zero_bound])))
    assert lines[0] == (
        "  cnn beats vit by 0.04 points, 95 % CI [-2.0, 0.03], p = 1.0: not a significant difference "
        "(3 vs 3 images only one of them gets right)"
    )
    assert "vit beats hybrid by 1.0 points, 95 % CI [0.0, 2.0], p = 0.5" in lines[1]  # the negated 0 is no '-0.0'
    assert "-0.0" not in "\n".join(lines)


def test_table_on_cpu_costs(comparison: Comparison) -> None:
    cpu = replace(
        comparison,
        models=[
            replace(m, costs=replace(m.costs, device="cpu", peak_train_memory=None), search=None)
            for m in comparison.models
        ],
    )
    cnn = row_of(costs_table(table_lines(cpu)), "cnn").split()
    assert cnn[3] == "cpu"
    assert cnn[-5:-1] == ["-", "-", "-", "-"]  # peak memory, search time, GPU-hours, trials


# ---------------------------------------------------------------- the Markdown page


def test_markdown_has_recommendation_rows_pairs_and_plots(comparison: Comparison) -> None:
    text = markdown(comparison)
    assert text.startswith("# ") and "skin" in text.splitlines()[0]
    assert f"**Recommendation: {RECOMMENDATION}**" in text
    for name in ("cnn", "vit", "hybrid", f"{REFERENCE} (reference)"):
        rows = [line for line in text.splitlines() if line.startswith(f"| {name} |")]
        assert len(rows) == (2 if name.endswith("(reference)") else 3), name  # scores, costs, against the reference
    assert "| 91.2 (88.0–94.1) |" in text
    assert "| search compute (full-resolution epochs) | search compute (recipe trainings) |" in text
    assert "| 40 | 123.4 | 8.2 |" in text  # cnn's trials, then its search's compute
    assert "| hybrid vs cnn | +1.3 [-0.4, 3.0] | 4 | 2 | 0.21 | no |" in text
    assert f"| {REFERENCE} vs" not in text  # the reference's pairs have their own section
    for name in PLOT_FILES:
        assert f"]({name})" in text
    assert "2000 resamples" in text and "0.05" in text


def test_markdown_shows_settings_configs_and_front(comparison: Comparison) -> None:
    text = markdown(comparison)
    for key, value in comparison.settings.items():
        assert f"**{key}**: {value}" in text
    assert "**classes**: 4 (benign, malignant, normal, other)" in text
    assert "**test images**: 240" in text
    assert "lr=0.00031, batch_size=64, augment=strong" in text
    (vit_costs,) = [line for line in text.splitlines() if line.startswith("| vit |") and "GiB" in line]
    assert vit_costs.endswith("| no |")
    (cnn_costs,) = [line for line in text.splitlines() if line.startswith("| cnn |") and "GiB" in line]
    assert cnn_costs.endswith("| yes |")


def test_markdown_escapes_pipes_in_cells(comparison: Comparison) -> None:
    odd = replace(comparison, models=[replace(comparison.models[0], name="a|b"), *comparison.models[1:]])
    text = markdown(odd)
    assert "| a\\|b |" in text


# ---------------------------------------------------------------- against the reference

CLAIM = "(the seed claims 85-92 % accuracy, training 3-5x faster than large models)"


def test_table_holds_each_lightweight_model_against_the_reference(comparison: Comparison) -> None:
    lines = table_lines(comparison)
    section = reference_section(lines)
    assert section[0] == f"Against the reference {REFERENCE} {CLAIM}"
    assert section[1:] == [
        f"  cnn: -3.9 points vs {REFERENCE}, 95 % CI [-7.0, -1.0], p < 0.001 (significant); "
        "trains 3.4x as fast (812 vs 240 images/s), within the seed's 3-5x; "
        "test accuracy 91.2 % [88.0, 94.1], within the seed's 85-92 %, though its interval reaches above it",
        f"  vit: -6.4 points vs {REFERENCE}, 95 % CI [-10.0, -3.0], p < 0.001 (significant); "
        "trains 3.4x as fast (812 vs 240 images/s), within the seed's 3-5x; "
        "test accuracy 88.7 % [85.0, 92.0], within the seed's 85-92 %, its whole interval too",
        f"  hybrid: -2.6 points vs {REFERENCE}, 95 % CI [-6.0, 0.8], p = 0.16 (not significant); "
        "trains 3.4x as fast (812 vs 240 images/s), within the seed's 3-5x; "
        "test accuracy 92.5 % [89.0, 95.5], above the seed's 85-92 %, though its interval reaches into it",
    ]
    assert all(REFERENCE not in line for line in paired_section(lines))
    assert lines.index(section[0]) < lines.index(f"Recommendation: {RECOMMENDATION}")


def test_reference_section_speaks_from_the_lightweight_side_however_the_pair_is_stored(comparison: Comparison) -> None:
    slow = replace(comparison.models[1], costs=replace(comparison.models[1].costs, train_images_per_s=60.0))
    models = [comparison.models[0], slow, *comparison.models[2:]]
    pairs = [
        PairedTest(REFERENCE, "cnn", Interval(-0.012, -0.03, 0.005), 0.3, 2, 5),  # cnn the more accurate
        PairedTest("vit", REFERENCE, Interval(-0.064, -0.1, -0.03), 0.00002, 2, 17),  # stored lightweight first
    ]
    cnn, vit, hybrid = reference_section(table_lines(replace(comparison, models=models, pairs=pairs)))[1:]
    assert cnn.startswith(f"  cnn: +1.2 points vs {REFERENCE}, 95 % CI [-0.5, 3.0], p = 0.3 (not significant);")
    assert vit.startswith(f"  vit: -6.4 points vs {REFERENCE}, 95 % CI [-10.0, -3.0], p < 0.001 (significant);")
    assert "trains 0.25x as fast (60.0 vs 240 images/s), below the seed's 3-5x" in vit
    assert hybrid.startswith(f"  hybrid: no paired test against {REFERENCE};")


def test_markdown_reference_section(comparison: Comparison) -> None:
    text = markdown(comparison)
    assert f"## Against the reference {REFERENCE} {CLAIM}" in text
    assert text.index("## Paired tests") < text.index("## Against the reference") < text.index("## Winning")
    assert (
        "| cnn | -3.9 [-7.0, -1.0] | < 0.001 | yes | 812 | 3.4x (within) | 91.2 (88.0–94.1) "
        "| within the seed's 85-92 %, though its interval reaches above it |"
    ) in text
    assert "| hybrid | -2.6 [-6.0, 0.8] | 0.16 | no | 812 | 3.4x (within) |" in text
    assert f"train images/s ({REFERENCE}: 240)" in text


def test_without_a_reference_there_is_no_reference_section(comparison: Comparison) -> None:
    alone = replace(comparison, models=comparison.models[:3], pairs=comparison.pairs[:2])
    lines = table_lines(alone)
    assert not any("reference" in line.lower() for line in lines)
    assert len(paired_section(lines)) == 2
    text = markdown(alone)
    assert "Against the reference" not in text and "## Paired tests" in text


def test_only_reference_pairs_leave_no_paired_tests_section(comparison: Comparison) -> None:
    only_reference = replace(comparison, pairs=comparison.pairs[2:])
    assert not any(line.startswith("Paired tests") for line in table_lines(only_reference))
    assert "## Paired tests" not in markdown(only_reference)
    assert len(reference_section(table_lines(only_reference))) == 4


# ---------------------------------------------------------------- the plots


def assert_pngs(paths: list[Path], folder: Path) -> None:
    assert paths == [folder / name for name in PLOT_FILES]
    for path in paths:
        data = path.read_bytes()
        assert data.startswith(PNG_MAGIC), path.name
        image = matplotlib.image.imread(path)
        assert image.ndim == 3 and image.shape[2] in (3, 4), path.name
        assert image.shape[0] > 150 and image.shape[1] > 300, (path.name, image.shape)
        assert image.std() > 0.01, path.name  # something was drawn, not a blank canvas


def test_write_plots(comparison: Comparison, tmp_path: Path) -> None:
    folder = tmp_path / "plots"  # not there yet
    assert_pngs(write_plots(comparison, folder), folder)


def test_write_plots_two_models_no_reference_cpu(comparison: Comparison, tmp_path: Path) -> None:
    cpu = [
        replace(m, costs=replace(m.costs, device="cpu", peak_train_memory=None), search=None)
        for m in comparison.models[:2]
    ]
    small = replace(comparison, models=cpu, pairs=comparison.pairs[:1])
    assert_pngs(write_plots(small, tmp_path), tmp_path)


def test_write_plots_many_classes_and_missing_latency(comparison: Comparison, tmp_path: Path) -> None:
    classes = [f"class{i}" for i in range(25)]
    rng = np.random.default_rng(0)
    models = [replace(m, confusion=rng.integers(0, 9, (25, 25))) for m in comparison.models]
    models[1] = replace(models[1], costs=replace(models[1].costs, latency_ms={}))
    many = replace(comparison, classes=classes, models=models)
    assert_pngs(write_plots(many, tmp_path), tmp_path)
    assert "n/a" in row_of(costs_table(table_lines(many)), "vit")


def test_row_normalised() -> None:
    shares = row_normalised(np.array([[3, 1], [0, 0]]))
    np.testing.assert_allclose(shares, [[0.75, 0.25], [0.0, 0.0]])  # a class with no image stays 0, not NaN


# ---------------------------------------------------------------- the Pareto front


def test_pareto_front_excludes_dominated() -> None:
    # (latency, accuracy): 1 is slower and less accurate than 0; 2 is slower but more accurate.
    assert pareto_front([(2.0, 0.90), (5.0, 0.85), (8.0, 0.95)]) == [0, 2]


def test_pareto_front_strictness() -> None:
    # Equal latency, lower accuracy: beaten. Equal accuracy, higher latency: beaten.
    assert pareto_front([(2.0, 0.90), (2.0, 0.80), (3.0, 0.90)]) == [0]


def test_pareto_front_keeps_ties() -> None:
    assert pareto_front([(2.0, 0.90), (2.0, 0.90), (9.0, 0.50)]) == [0, 1]


def test_pareto_front_single_empty_and_nan() -> None:
    assert pareto_front([(4.0, 0.7)]) == [0]
    assert pareto_front([]) == []
    # A point not measured is neither on the front nor does it beat any.
    assert pareto_front([(math.nan, 0.99), (3.0, 0.8), (1.0, math.nan)]) == [1]


def test_the_description_for_mlflow_has_no_plot_links(comparison: Comparison) -> None:
    """In the run's description a relative link finds no file: the plots are the run's artifacts there."""
    note = markdown(comparison, plots=False)
    assert "## Plots" not in note and ".png" not in note
    assert note.startswith(markdown(comparison).split("## Plots")[0].rstrip())
