"""--gpus-per-trial auto: the sharing arithmetic on given memory figures, and the probe without CUDA."""

from __future__ import annotations

import math
import os
import re
import sys
import types

import pytest

from search.study.gpu_share import (
    CARD_ENV,
    CUDA_CONTEXT_BYTES,
    FRACTION_STEP,
    GiB,
    GpuTooSmall,
    NoCudaError,
    choose_gpu_fraction,
    planned_free,
    probe_peak_memory,
    rehearsed_card,
)
from trainables.gpu_memory import MiB, allocator_fraction


def test_reference_card_two_trials_of_a_2_1_gib_peak():
    # 8 GiB card (RTX 2070 Super), 7.6 GiB free, 2.1 GiB peak: 2.1 * 1.15 + 500 MiB = 2.90 GiB a trial.
    plan = choose_gpu_fraction(int(2.1 * GiB), int(7.6 * GiB), 8 * GiB)
    assert plan.per_trial_bytes == math.ceil(int(2.1 * GiB) * 1.15) + CUDA_CONTEXT_BYTES
    assert plan.fraction == pytest.approx(0.3630)
    assert plan.trials == 2
    assert plan.fraction * 8 * GiB >= plan.per_trial_bytes  # the cap covers the budget
    assert plan.trials * plan.per_trial_bytes <= 7.6 * GiB  # and they all fit in what is free
    assert "2 trials" in plan.explanation and "\n" not in plan.explanation


def test_on_the_8_gb_card_a_cnn_trial_at_batch_32_is_sized_from_what_its_allocator_reserves():
    # Measured on an H200 (issue 23): a cnn trial at batch 32 allocated 2.81 GiB at most, its allocator reserved
    # about 23 % more (3.46 GiB), and its process used 3.95 GiB with the CUDA context. Planned from the allocated
    # peak, two such trials were put in the 8 GB card's 7.6 GiB free, where they need 2 x 3.95 = 7.9 GiB.
    allocated, reserved, process = int(2.81 * GiB), int(3.46 * GiB), int(3.95 * GiB)
    free, total = int(7.6 * GiB), 8 * GiB
    assert 2 * process > free  # why the old plan ran out of memory
    plan = choose_gpu_fraction(reserved, free, total)
    assert plan.trials == 1
    assert plan.per_trial_bytes >= process
    # Each trial's process stays within its budget: its allocator capped at the share less the context ...
    cap = allocator_fraction(plan.fraction, total) * total
    assert cap + CUDA_CONTEXT_BYTES <= plan.per_trial_bytes + FRACTION_STEP * total
    assert cap >= reserved  # ... which still holds what the trial reserves
    # ... and the trials placed together stay within the free memory.
    assert plan.trials * plan.per_trial_bytes <= free
    assert choose_gpu_fraction(allocated, free, total).trials == 2  # what planning on the allocated peak said


def test_a_trial_s_allocator_gets_its_share_less_the_cuda_context():
    total = 8 * GiB
    assert allocator_fraction(0.5, total) == pytest.approx(0.5 - CUDA_CONTEXT_BYTES / total)
    assert allocator_fraction(0.5, total, context_bytes=0) == 0.5
    assert allocator_fraction(1.0, total) == 1.0  # the whole GPU: nothing else is budgeted on it
    tiny = allocator_fraction(0.05, total)  # 410 MiB: less than a context; the trial keeps half for its allocator
    assert tiny == pytest.approx(0.025)
    with pytest.raises(ValueError, match="allocator_fraction"):
        allocator_fraction(0.0, total)


def test_a_rehearsed_8_gib_card_plans_with_its_own_free_memory(monkeypatch):
    h200 = 140 * GiB
    monkeypatch.setenv(CARD_ENV, "8")
    card = rehearsed_card()
    assert card == 8 * GiB
    # 0.5 GiB in use on the big card now: the rehearsed card has 7.5 GiB of its 8 free.
    free = planned_free(h200 - GiB // 2, h200, card)
    assert free == int(7.5 * GiB)
    plan = choose_gpu_fraction(2 * GiB, free, h200)
    assert plan.trials == 2  # 2 x 1.15 + 0.49 = 2.79 GiB a trial: 2 fit in 7.5 GiB (the H200 would take 50)
    assert plan.trials * plan.per_trial_bytes <= 8 * GiB
    assert plan.fraction * h200 >= plan.per_trial_bytes  # the share is of the real card
    monkeypatch.delenv(CARD_ENV)
    assert rehearsed_card() is None
    assert planned_free(h200 - GiB // 2, h200, None) == h200 - GiB // 2


@pytest.mark.parametrize("value", ["eight", "0", "-8", "nan"])
def test_a_rehearsed_card_that_is_no_size_is_refused_naming_the_variable(monkeypatch, value):
    monkeypatch.setenv(CARD_ENV, value)
    with pytest.raises(ValueError, match=CARD_ENV):
        rehearsed_card()


def test_free_memory_not_total_limits_the_number_of_trials():
    # 1 GiB budgets: 8 would fit the card, only 3 fit the 3.5 GiB that other processes left free.
    plan = choose_gpu_fraction(1 * GiB, int(3.5 * GiB), 8 * GiB, margin=0.0, overhead_bytes=0)
    assert plan.fraction == pytest.approx(0.125)
    assert plan.trials == 3


def test_exact_fit_is_one_trial():
    free = 6 * GiB
    plan = choose_gpu_fraction(free - 512 * MiB, free, 8 * GiB, margin=0.0, overhead_bytes=512 * MiB)
    assert plan.trials == 1
    assert plan.per_trial_bytes == free
    assert plan.fraction == pytest.approx(0.75)


def test_exact_ratios_are_not_rounded_up_a_step():
    plan = choose_gpu_fraction(2 * GiB, 8 * GiB, 8 * GiB, margin=0.0, overhead_bytes=0)
    assert plan.fraction == 0.25
    assert plan.trials == 4


def test_whole_card_fraction_is_one_never_more():
    plan = choose_gpu_fraction(8 * GiB, 8 * GiB, 8 * GiB, margin=0.0, overhead_bytes=0)
    assert plan.fraction == 1.0
    assert plan.trials == 1


def test_margin_is_headroom_on_the_peak():
    without = choose_gpu_fraction(int(1.9 * GiB), 8 * GiB, 8 * GiB, margin=0.0, overhead_bytes=0)
    with_margin = choose_gpu_fraction(int(1.9 * GiB), 8 * GiB, 8 * GiB, margin=0.15, overhead_bytes=0)
    assert without.trials == 4 and with_margin.trials == 3
    assert with_margin.fraction > without.fraction
    assert with_margin.per_trial_bytes == math.ceil(int(1.9 * GiB) * 1.15)


def test_fraction_is_rounded_up_to_rays_step_and_keeps_ray_consistent():
    plan = choose_gpu_fraction(1_000_000_007, 16 * GiB, 16 * GiB, margin=0.0, overhead_bytes=0)
    assert plan.fraction * 16 * GiB >= 1_000_000_007
    assert round(plan.fraction, 4) == plan.fraction
    assert plan.trials <= math.floor(1 / plan.fraction)  # Ray must be able to place them all


def test_a_trial_bigger_than_the_free_memory_is_a_one_line_error_with_the_fix():
    with pytest.raises(GpuTooSmall) as error:
        choose_gpu_fraction(int(6.8 * GiB), int(7.6 * GiB), 8 * GiB)
    message = str(error.value)
    assert "\n" not in message
    assert "batch_size" in message and "--img-size" in message
    assert "7.60 GiB free" in message
    assert isinstance(error.value, ValueError)


def test_a_trial_bigger_than_the_card_says_so():
    with pytest.raises(GpuTooSmall, match="the GPU's memory"):
        choose_gpu_fraction(9 * GiB, 8 * GiB, 8 * GiB, margin=0.0, overhead_bytes=0)


def test_one_byte_over_does_not_fit():
    with pytest.raises(GpuTooSmall):
        choose_gpu_fraction(4 * GiB + 1, 4 * GiB, 8 * GiB, margin=0.0, overhead_bytes=0)


@pytest.mark.parametrize(
    "peak, free, total, margin",
    [(0, GiB, GiB, 0.15), (GiB, 2 * GiB, GiB, 0.15), (GiB, GiB, 0, 0.15), (GiB, GiB, 2 * GiB, -0.1)],
)
def test_nonsense_figures_are_refused(peak, free, total, margin):
    with pytest.raises(ValueError, match="choose_gpu_fraction"):
        choose_gpu_fraction(peak, free, total, margin=margin)


def test_probe_without_cuda_raises_a_clear_error(monkeypatch):
    # A stand-in torch with no CUDA: the test runs the same on a GPU machine and needs no torch import.
    fake_torch = types.SimpleNamespace(cuda=types.SimpleNamespace(is_available=lambda: False))
    monkeypatch.setitem(sys.modules, "torch", fake_torch)
    with pytest.raises(NoCudaError, match="--gpus-per-trial 0"):
        probe_peak_memory("vit", 11, 32, 224)


def test_auto_means_the_cpu_on_a_machine_without_a_gpu():
    import torch

    from search.study.resources import GpuShare, given_gpu_share, local_resources, start_gpu_probe

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    config, checked = auto_inputs()
    assert config.gpus_per_trial is None  # 'auto'
    assert start_gpu_probe(config, checked) is None
    assert given_gpu_share(config, *local_resources()) == GpuShare(0.0, os.cpu_count())


def test_on_a_cluster_the_share_and_the_slots_come_from_the_cluster_s_resources():
    """A driver without a GPU on a cluster with GPUs: a given share packs the cluster's GPUs ('auto' is
    measured on one of them: test_cluster.py)."""
    from dataclasses import replace

    from search.errors import UsageError
    from search.study.resources import GpuShare, given_gpu_share

    config, _ = auto_inputs()
    assert given_gpu_share(replace(config, gpus_per_trial=0.25), 2, 32) == GpuShare(0.25, 8)
    assert given_gpu_share(replace(config, gpus_per_trial=0.0), 2, 32) == GpuShare(0.0, 32)
    with pytest.raises(UsageError, match="no CUDA GPU"):
        given_gpu_share(replace(config, gpus_per_trial=0.5), 0, 32)


def test_the_probe_process_hands_its_error_back():
    """GpuProbe's own machinery (spawn, pipe, re-raise) on a machine without CUDA."""
    import torch

    from search.study.gpu_share import GpuProbe

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    probe = GpuProbe("vit", 11, 32, 224)
    with pytest.raises(NoCudaError, match="--gpus-per-trial 0"):
        probe.result()
    probe.cancel()  # after the end: a no-op


class GivenProbe:
    """Stands in for GpuProbe: hands back fixed numbers, or raises."""

    def __init__(self, outcome):
        self.outcome = outcome

    def result(self):
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome


def auto_inputs():
    from search.run import build_parser
    from search.study.config import new_config
    from search.study.preflight import check_study

    config = new_config(build_parser().parse_args(["--model", "vit", "--data", "synthetic", "--no-pretrained"]))
    return config, check_study(config)


def test_a_measured_share_packs_the_card(capsys):
    from search.study.resources import GpuShare, measured_gpu_share

    probe = GivenProbe((int(2.1 * GiB), int(7.6 * GiB), 8 * GiB))
    assert measured_gpu_share(auto_inputs()[0], probe, gpus=1) == GpuShare(pytest.approx(0.3630), 2)
    assert measured_gpu_share(auto_inputs()[0], probe, gpus=3).max_concurrent == 6  # e.g. a cluster's GPUs
    assert "--gpus-per-trial auto: one trial needs" in capsys.readouterr().out


@pytest.mark.parametrize(
    "error, message",
    [
        (GpuTooSmall("one trial needs 9.00 GiB"), "one trial needs 9.00 GiB"),
        (
            RuntimeError("CUDA error: out of memory\nmore lines"),
            "could not measure the GPU (CUDA error: out of memory)",
        ),
    ],
)
def test_a_probe_that_fails_is_a_usage_error(error, message):
    from search.errors import UsageError
    from search.study.resources import measured_gpu_share

    with pytest.raises(UsageError, match=re.escape(message)) as raised:
        measured_gpu_share(auto_inputs()[0], GivenProbe(error), gpus=1)
    assert "\n" not in str(raised.value)
