"""Fixtures of the extraction fault tests: a tiny dataset and a reference extraction (the
small file systems to fill up: `tmpfs` in tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from samkd.demo.shapes import write_shapes_dataset

from .fault_helpers import run_extract_process


@pytest.fixture(scope="session")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_shapes_dataset(tmp_path_factory.mktemp("data") / "shapes", 6, (96, 128))


@pytest.fixture(scope="session")
def reference(tmp_path_factory: pytest.TempPathFactory, shapes: Path) -> Path:
    """An extraction of `shapes` that nothing disturbed."""
    output = tmp_path_factory.mktemp("reference") / "f.h5"
    completed = run_extract_process(shapes, output)
    assert completed.returncode == 0, completed.stderr[-2000:]
    return output
