"""The one condition for tests that need an NVIDIA GPU: marked `cuda` (`-m cuda` selects them), skipped without one."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import pytest
import torch

Test = TypeVar("Test", bound=Callable)

CUDA_MARKS = (
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU: torch sees no CUDA device"),
)
"""For a module of CUDA tests: `pytestmark = list(CUDA_MARKS)`."""


def requires_cuda(test: Test) -> Test:
    """A test that needs an NVIDIA GPU: marked `cuda`, and skipped where torch sees none."""
    for mark in CUDA_MARKS:
        test = mark(test)
    return test
