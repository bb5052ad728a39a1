"""Feature files on shared storage: readers take no HDF5 file lock, so a file opens and reads
while another process holds one (as a writer on NFS or Lustre, or a stale lock, would)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import h5py
import pytest
import torch

import samkd.features.layout
import samkd.features.rows
from samkd.features import FeatureStore, inspect_feature_file, read_decoder_state_dict
from samkd.features.layout import locking_option_supported, open_read_only, read_index_file

from .feature_helpers import extract, make_plan

# Opens the file as a writer does (mode "a", HDF5's default locking: an exclusive lock),
# says so, and keeps it open until its stdin closes.
HOLD_LOCK = """
import sys, h5py
handle = h5py.File(sys.argv[1], "a")
print("locked", flush=True)
sys.stdin.read()
handle.close()
"""


@pytest.fixture(scope="module", params=["copy", "virtual"])
def feature_file(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp(request.param)
    plan = make_plan(num_images=6, shard_size=4)
    output = extract(folder / "features.h5", plan, layout=request.param)
    assert output is not None
    return output


@pytest.fixture
def locked(feature_file: Path) -> Iterator[Path]:
    """The feature file (and, behind a virtual one, its first shard) held open with HDF5's
    exclusive lock by other processes."""
    held = [feature_file, *sorted(feature_file.parent.rglob("part-00000.h5"))[:1]]
    environment = {
        key: value for key, value in os.environ.items() if key != "HDF5_USE_FILE_LOCKING"
    }
    holders = []
    try:
        for path in held:
            holder = subprocess.Popen(
                [sys.executable, "-c", HOLD_LOCK, str(path)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                env=environment,
                text=True,
            )
            holders.append(holder)
            assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        yield feature_file
    finally:
        for holder in holders:
            holder.communicate("")


def default_locking_open(path: Path) -> subprocess.CompletedProcess:
    """Open `path` read-only with HDF5's default locking, in a fresh process."""
    environment = {
        key: value for key, value in os.environ.items() if key != "HDF5_USE_FILE_LOCKING"
    }
    return subprocess.run(
        [sys.executable, "-c", f"import h5py; h5py.File({str(path)!r}, 'r').close()"],
        capture_output=True,
        text=True,
        env=environment,
    )


def test_a_feature_file_reads_while_another_process_holds_an_hdf5_lock(
    locked: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The lock is real: a reader with HDF5's default locking cannot open the file.
    refused = default_locking_open(locked)
    assert refused.returncode != 0 and "unable to lock file" in refused.stderr
    store = FeatureStore(locked, teachers=["vit_h"])
    rows = [store[index]["vit_h"]["encoder.embed"] for index in range(len(store))]
    assert len(rows) == 6 and all(row.shape == (256, 16, 16) for row in rows)
    assert store.pseudo_mask_teacher is None
    store.close()
    monkeypatch.setattr(samkd.features.rows, "chunk_offsets", lambda dataset: None)
    with_hdf5 = FeatureStore(locked, teachers=["vit_h"], taps=["encoder.block.3"])  # via h5py
    assert with_hdf5[5]["vit_h"]["encoder.block.3"].shape == (32, 16, 16)
    with_hdf5.close()
    assert len(read_index_file(locked)) == 6
    assert read_decoder_state_dict(locked, "vit_h")
    report = inspect_feature_file(locked, check=True)
    assert report.status == "complete" and not report.problems


def test_readers_open_without_hdf5_locking(feature_file: Path) -> None:
    with open_read_only(feature_file) as handle:
        assert handle.id.get_access_plist().get_file_locking() == (False, False)


def test_an_hdf5_without_the_locking_option_opens_with_the_default(
    feature_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """h5py refuses `locking=` under HDF5 < 1.12.1 (and 1.10 < 1.10.7): the environment
    (HDF5_USE_FILE_LOCKING) decides there."""
    opened: list[dict] = []
    real_file = h5py.File

    def recording_file(path: Path, mode: str, **options: object) -> h5py.File:
        opened.append(options)
        return real_file(path, mode, **options)

    monkeypatch.setattr(samkd.features.layout.h5py, "File", recording_file)
    monkeypatch.setattr(h5py.version, "hdf5_version_tuple", (1, 10, 6))
    store = FeatureStore(feature_file, teachers=["vit_b"], dtype=torch.float16)
    assert store[2]["vit_b"]["decoder.iou"].shape == (3,)
    assert opened and all("locking" not in options for options in opened)
    store.close()


@pytest.mark.parametrize(
    ("version", "supported"),
    [((1, 10, 6), False), ((1, 10, 7), True), ((1, 12, 0), False), ((1, 12, 1), True),
     ((1, 14, 2), True), ((2, 0, 0), True)],
)  # fmt: skip
def test_the_locking_option_needs_hdf5_1_12_1_or_1_10_7(
    version: tuple[int, int, int], supported: bool
) -> None:
    assert locking_option_supported(version) is supported
