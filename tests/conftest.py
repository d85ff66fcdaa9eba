"""Fixtures shared by the tests; helper functions live in tests/helpers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import write_image_folder
from helpers.smoke_study import Record, run_smoke_study

from trainables.privacy import SALT_ENV

# The tests' own salt for patient ids (and their studies', which inherit it): no test makes one in the home folder.
# tests/test_privacy.py unsets it where it tests the salt file, under a configuration folder of its own.
os.environ.setdefault(SALT_ENV, "the tests' own salt")


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return write_image_folder(tmp_path / "images", {"benign": 10, "malignant": 10, "normal": 10})


@pytest.fixture(scope="session")
def smoke_study(tmp_path_factory) -> Record:
    """One vit --smoke study for the whole session (all its workers), built on first use; its users only read it."""
    return run_smoke_study(tmp_path_factory)
