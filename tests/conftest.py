"""Fixtures shared by the feature-store and extraction tests."""

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
