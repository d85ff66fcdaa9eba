"""bench/search_efficiency.py's replay on a tiny table with known curves: the harness measures what it says."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import search_efficiency as bench

EPOCHS = 4
CONFIGS = 12


@pytest.fixture(scope="module")
def table() -> bench.CurveTable:
    """12 configurations of spaces/cnn.yaml (0: the recipe) x 4 epochs. Configuration c climbs to 0.3 + 0.05 c,
    the recipe (0) ending lowest; the resolution curve is the same scores, its first two epochs at half size."""
    configs = bench.draw_configs(bench.new_space("cnn"), CONFIGS - 1, seed=0)
    final = 0.3 + 0.05 * np.arange(CONFIGS)[:, None]
    val_acc = final * np.arange(1, EPOCHS + 1) / EPOCHS
    full = bench.Curves(val_acc, np.ones_like(val_acc), np.full(val_acc.shape, 32), np.ones_like(val_acc))
    sizes = np.array([16, 16, 32, 32])[None, :].repeat(CONFIGS, axis=0)
    resolution = bench.Curves(val_acc, (sizes / 32) ** 2, sizes, np.ones_like(val_acc))
    curves = {bench.FULL: full, bench.RESOLUTION: resolution}
    return bench.CurveTable("cnn", configs, curves, bench.scales_of("cnn"))


@pytest.fixture(scope="module")
def studies(table) -> dict[str, list[bench.Study]]:
    arms = tuple(arm for arm in bench.ARMS if arm.name in {"random", "random + ASHA", "tuned TPE + ASHA + recipe"})
    return bench.replay_table(table, arms, seeds=[1, 2], trials=8)


def test_a_recorded_configuration_is_its_own_nearest(table):
    assert [table.nearest(config) for config in table.configs] == list(range(CONFIGS))


def test_asha_spends_less_than_running_every_trial_whole(studies):
    for whole, stopped in zip(studies["random"], studies["random + ASHA"], strict=True):
        assert stopped.configs == whole.configs  # RandomSampler proposes the same: the difference is ASHA's
        assert whole.total == 8 * EPOCHS
        assert stopped.total < whole.total


def test_a_recipe_study_runs_the_recipe_whole_and_never_ends_below_it(table, studies):
    for study in studies["tuned TPE + ASHA + recipe"]:
        assert study.configs[0] == 0
        assert study.best >= table.recipe_score


def test_compute_to_target_is_the_compute_at_the_first_full_size_epoch_that_reaches_it():
    study = bench.Study(
        compute=np.array([0.25, 0.25, 1.0, 1.0, 1.0]),
        val_acc=np.array([0.95, 0.50, 0.60, 0.945, 0.99]),
        full_size=np.array([False, False, True, True, True]),
        configs=(0, 1),
    )
    # The 0.95 at half size is no result; 0.945 at full size is the first to reach 0.94.
    assert study.compute_to(0.94) == pytest.approx(2.5)
    assert study.compute_to(0.98) == pytest.approx(3.5)
    assert study.compute_to(1.2) == float("inf")
    assert study.best == pytest.approx(0.99)
