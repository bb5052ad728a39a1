"""HDF5 helpers shared by the writer, the joiner and the readers (see `schema` for the layout)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from samkd.features.schema import (
    GZIP_LEVEL,
    Compression,
    ImageRecord,
    StorageDtype,
    TapSpec,
    TeacherSpec,
)
from samkd.files import atomic_path

STRING = h5py.string_dtype("utf-8")
HASH_DTYPE = "S64"
# A pseudo-mask teacher's datasets, in a shard and in its group of the joined file.
PSEUDO_MASKS = "pseudo_masks"
PSEUDO_MASKS_CRC32 = "pseudo_masks_crc32"
PSEUDO_MASK_COUNTS = "pseudo_mask_counts"


def open_read_only(path: Path, **options: Any) -> h5py.File:
    """`path` opened read-only, without HDF5's file lock where HDF5 lets it be turned off.

    On NFS or Lustre HDF5's lock fails ("unable to lock file") or makes nodes wait for each
    other, and a reader needs none: samkd publishes a file (by rename) only once it is
    complete, and its own lock file (`samkd.features.lock`) keeps writers apart. HDF5 before
    1.12.1 (or 1.10.7) has no such option, and h5py refuses it: there the environment decides
    (`HDF5_USE_FILE_LOCKING=FALSE`).
    """
    if locking_option_supported(h5py.version.hdf5_version_tuple):
        options["locking"] = False
    return h5py.File(path, "r", **options)


def locking_option_supported(hdf5_version: tuple[int, ...]) -> bool:
    """Whether h5py accepts `locking=` with this HDF5 version (H5Pset_file_locking)."""
    return tuple(hdf5_version) >= (1, 12, 1) or (1, 10, 7) <= tuple(hdf5_version) < (1, 11)


def discard_hdf5(handle: h5py.File, path: Path) -> None:
    """Close `handle` and delete its file `path`, even on a full disk.

    HDF5 flushes a file as it closes it; when that fails (no space left), it keeps the file
    and its datasets open, and closing them again at exit crashes the interpreter (exit
    139). The bytes of a file about to be deleted need not reach the disk: its descriptor
    is pointed at an anonymous in-memory file before the close.
    """
    try:
        with suppress(Exception):
            if handle.id.valid:
                _write_to_memory(handle.id.get_vfd_handle())
        with suppress(Exception):
            handle.close()
    finally:
        path.unlink(missing_ok=True)


def _write_to_memory(descriptor: int) -> None:
    """Make `descriptor` refer to a new in-memory file (it no longer writes to disk)."""
    memory = os.memfd_create("samkd-discarded")
    try:
        os.dup2(memory, descriptor)
    finally:
        os.close(memory)


@contextmanager
def written_hdf5(path: Path, exclusive: bool = False) -> Iterator[h5py.File]:
    """A new HDF5 file, published as `path` once the block succeeds and the file is closed
    (see `samkd.files.atomic_path`); discarded (see `discard_hdf5`) otherwise."""
    with atomic_path(path, exclusive=exclusive) as temporary:
        handle = h5py.File(temporary, "w")
        try:
            yield handle
            handle.close()
        except BaseException:
            discard_hdf5(handle, temporary)
            raise


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def compression_options(compression: Compression) -> dict[str, Any]:
    """Keyword arguments of `create_dataset` for a compression name."""
    if compression == "gzip":
        return {"compression": "gzip", "compression_opts": GZIP_LEVEL}
    if compression == "lzf":
        return {"compression": "lzf"}
    return {}


def create_tap_dataset(
    group: h5py.Group, tap: TapSpec, num_images: int, dtype: StorageDtype, compression: Compression
) -> h5py.Dataset:
    """`num_images x *tap.shape`, one image per chunk, so any image is read with one chunk."""
    dataset = group.create_dataset(
        tap.name,
        shape=(num_images, *tap.shape),
        dtype=dtype,
        chunks=(1, *tap.shape),
        **compression_options(compression),
    )
    dataset.attrs["kind"] = str(tap.kind)
    return dataset


def create_pseudo_mask_datasets(
    group: h5py.Group, rows: int
) -> tuple[h5py.Dataset, h5py.Dataset, h5py.Dataset]:
    """The `(rows,)` pseudo-mask rows (JSON strings), their crc32 and their mask counts."""
    return (
        group.create_dataset(PSEUDO_MASKS, shape=(rows,), dtype=STRING),
        group.create_dataset(PSEUDO_MASKS_CRC32, shape=(rows,), dtype=np.uint32),
        group.create_dataset(PSEUDO_MASK_COUNTS, shape=(rows,), dtype=np.int32),
    )


def write_image_index(
    group: h5py.Group, images: Sequence[ImageRecord], preprocessing: Mapping[str, Any]
) -> None:
    """/images: ids, original sizes, content hashes, file stats and the preprocessing (JSON)."""
    group.create_dataset("ids", data=np.array([i.id for i in images], dtype=object), dtype=STRING)
    sizes = np.array([(i.height, i.width) for i in images], dtype=np.int64).reshape(-1, 2)
    group.create_dataset("original_sizes", data=sizes)
    hashes = np.array([i.sha256.encode("ascii") for i in images], dtype=HASH_DTYPE)
    group.create_dataset("sha256", data=hashes, dtype=HASH_DTYPE)
    group.create_dataset("file_sizes", data=np.array([i.file_size for i in images], np.int64))
    group.create_dataset("file_mtimes_ns", data=np.array([i.mtime_ns for i in images], np.int64))
    group.attrs["preprocessing"] = json.dumps(dict(preprocessing), sort_keys=True)


def read_image_index(group: h5py.Group) -> tuple[ImageRecord, ...]:
    """The records of /images; file stats are -1 in files written before they were stored."""
    ids = group["ids"].asstr()[()]
    sizes = group["original_sizes"][()]
    hashes = group["sha256"][()]
    unknown = np.full(len(ids), -1, dtype=np.int64)
    file_sizes = group["file_sizes"][()] if "file_sizes" in group else unknown
    mtimes = group["file_mtimes_ns"][()] if "file_mtimes_ns" in group else unknown
    return tuple(
        ImageRecord(str(image_id), int(size[0]), int(size[1]), digest.decode("ascii"), *stat)
        for image_id, size, digest, *stat in zip(
            ids, sizes, hashes, file_sizes.tolist(), mtimes.tolist(), strict=True
        )
    )


def read_index_file(path: Path) -> tuple[ImageRecord, ...]:
    """The image records of a feature file, a parts folder's `index.h5` or a hash checkpoint."""
    with open_read_only(path) as handle:
        return read_image_index(handle["images"])


def read_skipped(group: h5py.Group) -> np.ndarray:
    """Why each image of a shard or of `/images` was skipped at extraction ("": it was
    not), as an object array of str; all "" where no list is stored (none was skipped)."""
    if "skipped" not in group:
        rows = group["done"].shape[0] if "done" in group else group["ids"].shape[0]
        return np.full(rows, "", dtype=object)
    return np.array(group["skipped"].asstr()[()], dtype=object)


def read_skipped_images(group: h5py.Group) -> dict[int, str]:
    """The images of `/images` that extraction skipped: index -> why."""
    if "skipped" not in group:
        return {}
    reasons = group["skipped"].asstr()[()]
    return {int(index): str(reasons[index]) for index in np.flatnonzero(reasons != "")}


def write_skipped_images(group: h5py.Group, reasons: np.ndarray) -> None:
    """`/images/skipped`: per image, why it was skipped at extraction, or ""."""
    group.create_dataset("skipped", data=np.asarray(reasons, dtype=object), dtype=STRING)


def write_teacher_attrs(group: h5py.Group, teacher: TeacherSpec) -> None:
    group.attrs["model_type"] = teacher.model_type
    group.attrs["image_size"] = teacher.image_size
    group.attrs["checkpoint_name"] = teacher.checkpoint_name or ""
    group.attrs["checkpoint_sha256"] = teacher.checkpoint_sha256 or ""
    group.attrs["taps"] = json.dumps(teacher.tap_names)
    group.attrs["tap_kinds"] = json.dumps({tap.name: tap.kind for tap in teacher.taps})
    group.attrs["frame"] = teacher.frame


def write_index_file(
    path: Path,
    images: Sequence[ImageRecord],
    preprocessing: Mapping[str, Any],
    exclusive: bool = True,
) -> None:
    """An image index file (`index.h5`), published atomically (`exclusive`: first one wins)."""
    with written_hdf5(path, exclusive=exclusive) as handle:
        write_image_index(handle.create_group("images"), images, preprocessing)


def write_state_dict_file(path: Path, state: Mapping[str, np.ndarray]) -> None:
    """A decoder state dict as one dataset per key, published atomically."""
    with written_hdf5(path) as handle:
        for key in sorted(state):
            handle.create_dataset(key, data=state[key])


def copy_state_dict(source: h5py.Group, target: h5py.Group) -> None:
    for key in source:
        target.create_dataset(key, data=source[key][()])
