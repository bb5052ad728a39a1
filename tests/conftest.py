"""Fixtures shared across the test packages."""

import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import samkd.features.images


@pytest.fixture
def hashed(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The image files that extraction or a training check hashes (sha256), in call order."""
    calls: list[Path] = []
    real = samkd.features.images.file_sha256

    def counting(path: Path, *args: object) -> str:
        calls.append(path)
        return real(path)

    monkeypatch.setattr(samkd.features.images, "file_sha256", counting)
    return calls


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """`tmpfs(name, size, read_only=False)`: a new tmpfs of `size` ("8m") at tmp_path/name,
    unmounted at the end; skips the test where mounting is not permitted (not root)."""
    mounted: list[Path] = []

    def mount(name: str, size: str, read_only: bool = False) -> Path:
        if shutil.which("mount") is None:
            pytest.skip("cannot mount a tmpfs here: no mount command")
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
