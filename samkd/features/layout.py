"""HDF5 helpers shared by the writer, the joiner and the readers (see `schema` for the layout)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from samkd.features.schema import (
    GZIP_LEVEL,
    Compression,
    ExtractionPlan,
    ImageRecord,
    StorageDtype,
    TapSpec,
    TeacherSpec,
    publish,
    temporary_path,
)

STRING = h5py.string_dtype("utf-8")
HASH_DTYPE = "S64"


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


def write_image_index(group: h5py.Group, plan: ExtractionPlan) -> None:
    """/images: ids, original sizes, content hashes and the preprocessing (attr, JSON)."""
    images = plan.images
    group.create_dataset("ids", data=np.array([i.id for i in images], dtype=object), dtype=STRING)
    sizes = np.array([(i.height, i.width) for i in images], dtype=np.int64).reshape(-1, 2)
    group.create_dataset("original_sizes", data=sizes)
    hashes = np.array([i.sha256.encode("ascii") for i in images], dtype=HASH_DTYPE)
    group.create_dataset("sha256", data=hashes, dtype=HASH_DTYPE)
    group.attrs["preprocessing"] = json.dumps(dict(plan.preprocessing), sort_keys=True)


def read_image_index(group: h5py.Group) -> tuple[ImageRecord, ...]:
    ids = group["ids"].asstr()[()]
    sizes = group["original_sizes"][()]
    hashes = group["sha256"][()]
    return tuple(
        ImageRecord(str(image_id), int(size[0]), int(size[1]), digest.decode("ascii"))
        for image_id, size, digest in zip(ids, sizes, hashes, strict=True)
    )


def write_teacher_attrs(group: h5py.Group, teacher: TeacherSpec) -> None:
    group.attrs["model_type"] = teacher.model_type
    group.attrs["image_size"] = teacher.image_size
    group.attrs["checkpoint_name"] = teacher.checkpoint_name or ""
    group.attrs["checkpoint_sha256"] = teacher.checkpoint_sha256 or ""
    group.attrs["taps"] = json.dumps(teacher.tap_names)
    group.attrs["tap_kinds"] = json.dumps({tap.name: tap.kind for tap in teacher.taps})


def write_index_file(path: Path, plan: ExtractionPlan) -> None:
    """The parts folder's `index.h5`, published atomically (first writer wins)."""
    temporary = temporary_path(path)
    with h5py.File(temporary, "w") as handle:
        write_image_index(handle.create_group("images"), plan)
    publish(temporary, path, exclusive=True)


def write_state_dict_file(path: Path, state: Mapping[str, np.ndarray]) -> None:
    """A decoder state dict as one dataset per key, published atomically."""
    temporary = temporary_path(path)
    with h5py.File(temporary, "w") as handle:
        for key in sorted(state):
            handle.create_dataset(key, data=state[key])
    publish(temporary, path)


def copy_state_dict(source: h5py.Group, target: h5py.Group) -> None:
    for key in source:
        target.create_dataset(key, data=source[key][()])
