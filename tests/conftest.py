"""Fixtures shared by the tests; helper functions live in tests/helpers."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import write_image_folder


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return write_image_folder(tmp_path / "images", {"benign": 10, "malignant": 10, "normal": 10})
