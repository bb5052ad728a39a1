"""Fixtures of the extraction fault tests: a tiny dataset, a reference extraction, and small
file systems (tmpfs) to fill up or mount read-only."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from samkd.demo.shapes import write_shapes_dataset

from .fault_helpers import Mount, run_extract_process


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


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Mount]:
    """`tmpfs(name, size, read_only=False)`: a new tmpfs of `size` ("8m") at tmp_path/name;
    skips the test where mounting is not permitted. Unmounted at the end."""
    mounted: list[Path] = []

    def mount(name: str, size: str, read_only: bool = False) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        options = f"size={size}" + (",ro" if read_only else "")
        completed = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
            capture_output=True,
            text=True,
        )
        if completed.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {completed.stderr.strip()}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in reversed(mounted):
        subprocess.run(["umount", "-l", str(folder)], check=False)
