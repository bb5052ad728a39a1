"""Reading checks every row against its stored crc32: damaged rows raise or are skipped."""

from __future__ import annotations

import shutil
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import samkd.features.rows
from samkd.features import FeatureChecksumError, FeatureStore, FeatureStoreError

from .feature_helpers import extract, make_plan

DAMAGED = 3
DAMAGED_ID = f"img_{DAMAGED:04d}.jpg"


@pytest.fixture(scope="module")
def clean_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    output = extract(tmp_path_factory.mktemp("clean") / "features.h5", make_plan(num_images=6))
    assert output is not None
    return output


@pytest.fixture()
def damaged_file(clean_file: Path, tmp_path: Path) -> Path:
    """A copy whose `vit_b` `encoder.block.3` row of image 3 was overwritten in place (as a
    bad disk or copy would), its stored crc32 left as it was."""
    path = tmp_path / "features.h5"
    shutil.copy(clean_file, path)
    with h5py.File(path, "r+") as handle:
        dataset = handle["teachers/vit_b/taps/encoder.block.3"]
        row = dataset[DAMAGED]
        row[0, 0, :4] += 1.0
        dataset[DAMAGED] = row
    return path


@pytest.fixture(params=["pread", "hdf5"])
def read_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways a row is read: one pread at its chunk, and h5py where it is no plain chunk."""
    if request.param == "hdf5":
        monkeypatch.setattr(samkd.features.rows, "chunk_offsets", lambda dataset: None)
    return str(request.param)


def test_damaged_row_raises_one_line_naming_image_and_tap(
    damaged_file: Path, read_path: str
) -> None:
    store = FeatureStore(damaged_file)
    store[DAMAGED - 1]
    with pytest.raises(FeatureChecksumError) as error:
        store[DAMAGED]
    message = str(error.value)
    assert isinstance(error.value, FeatureStoreError)
    assert "\n" not in message
    assert message.startswith(
        f"features.h5: teacher 'vit_b' tap 'encoder.block.3' image '{DAMAGED_ID}': "
        "checksum mismatch (stored crc32 "
    )
    assert "rerun `samkd extract`" in message and "data.on_error=skip" in message
    with pytest.raises(FeatureChecksumError):
        store[DAMAGED_ID]  # raised on every read, not once


def test_skip_leaves_the_image_out_and_counts_it(
    damaged_file: Path, clean_file: Path, read_path: str
) -> None:
    store = FeatureStore(damaged_file, on_error="skip")
    clean = FeatureStore(clean_file)
    assert store.read(DAMAGED) == {}
    assert store.read(DAMAGED_ID, flip=True) == {}
    assert list(store.skipped_rows) == [DAMAGED_ID]
    assert "tap 'encoder.block.3'" in store.skipped_rows[DAMAGED_ID]
    for index in (i for i in range(len(store)) if i != DAMAGED):
        read, expected = store[index], clean[index]
        for teacher, taps in expected.items():
            for tap, tensor in taps.items():
                assert torch.equal(read[teacher][tap], tensor), (index, teacher, tap)
    assert list(store.skipped_rows) == [DAMAGED_ID]


def test_tap_selection_without_the_damaged_tap_reads_it(damaged_file: Path) -> None:
    store = FeatureStore(damaged_file, taps=["encoder.embed", "decoder.iou"])
    assert set(store[DAMAGED]) == {"vit_h", "vit_b"}


def test_verify_false_reads_the_damaged_bytes(damaged_file: Path, clean_file: Path) -> None:
    unchecked = FeatureStore(damaged_file, verify=False)[DAMAGED]["vit_b"]["encoder.block.3"]
    clean = FeatureStore(clean_file)[DAMAGED]["vit_b"]["encoder.block.3"]
    assert not torch.equal(unchecked, clean)
    assert np.array_equal(unchecked[0, 1:].numpy(), clean[0, 1:].numpy())


def test_unknown_on_error_is_refused(clean_file: Path) -> None:
    with pytest.raises(ValueError, match="on_error must be one of"):
        FeatureStore(clean_file, on_error="ignore")  # type: ignore[arg-type]


def test_crc32_matches_the_writers_zlib_crc32() -> None:
    values = np.random.default_rng(0).standard_normal((3, 33, 7)).astype(np.float16)
    assert samkd.features.reader.crc32(values) == zlib.crc32(values.tobytes())
