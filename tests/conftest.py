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
    """One vit --smoke study for the whole session, built on first use; its users only read it."""
    return run_smoke_study(tmp_path_factory)


SHARED_STUDY_MODULES = {"test_end_to_end", "test_study_record"}
"""The modules that read the session's smoke study: one worker runs them all, so the study is built once."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """With pytest-xdist (pyproject's addopts), each module runs on one worker, as a module-scoped fixture (a
    study, a server) is built once per worker that needs it; the modules that share the session's study, on one."""
    for item in items:
        module = item.module.__name__ if item.module else item.nodeid
        group = "smoke_study" if module in SHARED_STUDY_MODULES else module
        item.add_marker(pytest.mark.xdist_group(group))
