"""Fixtures shared by the tests; helper functions live in tests/helpers."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import write_image_folder
from helpers.smoke_study import Record, run_smoke_study


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return write_image_folder(tmp_path / "images", {"benign": 10, "malignant": 10, "normal": 10})


@pytest.fixture(scope="session")
def smoke_study(tmp_path_factory) -> Record:
    """One vit --smoke study for the whole session (all its workers), built on first use; its users only read it."""
    return run_smoke_study(tmp_path_factory)
