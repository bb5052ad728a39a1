"""Joining the shards of `<output>.parts/` into the one file that readers open."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from samkd.features.layout import (
    PSEUDO_MASK_COUNTS,
    PSEUDO_MASKS,
    PSEUDO_MASKS_CRC32,
    copy_state_dict,
    create_pseudo_mask_datasets,
    create_tap_dataset,
    open_read_only,
    read_skipped,
    write_skipped_images,
    write_teacher_attrs,
    written_hdf5,
)
from samkd.features.schema import (
    FILE_FORMAT,
    PSEUDO_MASKS_SCHEMA_VERSION,
    SCHEMA_VERSION,
    SKIPPED_SCHEMA_VERSION,
    FeatureStoreError,
    JoinLayout,
    TeacherSpec,
    decoder_path,
    parts_dir,
    shard_path,
    teacher_from_json,
)
from samkd.files import remove_temporaries


def read_parts_plan(output: Path) -> tuple[dict[str, Any], list[TeacherSpec]]:
    """The stored plan of `output`'s parts folder and its teachers."""
    plan_file = parts_dir(output) / "plan.json"
    if not plan_file.exists():
        raise FeatureStoreError(f"{output.name}: no extraction in progress ({plan_file} missing)")
    stored = json.loads(plan_file.read_text())
    return stored, [teacher_from_json(record) for record in stored["teachers"]]


def shard_count(stored: Mapping[str, Any]) -> int:
    return -(-int(stored["num_images"]) // int(stored["shard_size"]))


def missing_shards(output: Path) -> list[Path]:
    """Shard files of the parts folder that are not on disk yet, all teachers."""
    stored, teachers = read_parts_plan(output)
    return [
        shard_path(output, teacher.name, shard)
        for teacher in teachers
        for shard in range(shard_count(stored))
        if not shard_path(output, teacher.name, shard).exists()
    ]


def join_shards(output: Path, layout: JoinLayout = "copy", keep_parts: bool = False) -> Path:
    """Write `output` from its complete parts folder (temporary name, then rename).

    `layout="copy"` copies every chunk as stored (no decompression; the parts folder is
    removed unless `keep_parts`); `"virtual"` makes each tap an HDF5 virtual dataset over
    the shards by relative path, so the parts folder must stay next to the output; the
    pseudo-masks are copied in either layout. Raises FeatureStoreError naming the missing
    shards when any is absent.
    """
    output = Path(output)
    missing = missing_shards(output)
    if missing:
        names = ", ".join(str(path.relative_to(output.parent)) for path in missing[:3])
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise FeatureStoreError(
            f"{output.name}: {len(missing)} shards missing ({names}{more}); rerun the extraction"
        )
    stored, teachers = read_parts_plan(output)
    remove_temporaries(output)  # of a join killed midway: as big as the output
    with written_hdf5(output) as handle:
        _write_root(handle, stored, layout)
        with open_read_only(parts_dir(output) / "index.h5") as index:
            index.copy(index["images"], handle, "images")
        for teacher in teachers:
            group = handle.create_group(f"teachers/{teacher.name}")
            write_teacher_attrs(group, teacher)
            _join_teacher(output, group, teacher, stored, layout)
        skipped = skipped_in_shards(output, teachers, stored)
        if (skipped != "").any():
            write_skipped_images(handle["images"], skipped)
            handle.attrs["schema_version"] = SKIPPED_SCHEMA_VERSION
        if stored.get("pseudo_masks") is not None:
            handle.attrs["schema_version"] = PSEUDO_MASKS_SCHEMA_VERSION
    if layout == "copy" and not keep_parts:
        shutil.rmtree(parts_dir(output))
    return output


def _write_root(handle: h5py.File, stored: Mapping[str, Any], layout: JoinLayout) -> None:
    from samkd import __version__

    handle.attrs["format"] = FILE_FORMAT
    handle.attrs["schema_version"] = SCHEMA_VERSION
    handle.attrs["samkd_version"] = __version__
    handle.attrs["created"] = stored["created"]
    handle.attrs["dtype"] = stored["dtype"]
    handle.attrs["compression"] = stored["compression"]
    handle.attrs["shard_size"] = stored["shard_size"]
    handle.attrs["settings"] = stored["settings"]
    handle.attrs["plan"] = json.dumps(stored, indent=1)
    handle.attrs["layout"] = layout


def _join_teacher(
    output: Path,
    group: h5py.Group,
    teacher: TeacherSpec,
    stored: Mapping[str, Any],
    layout: JoinLayout,
) -> None:
    num_images, shard_size = int(stored["num_images"]), int(stored["shard_size"])
    shards = [shard_path(output, teacher.name, shard) for shard in range(shard_count(stored))]
    taps, checksums = group.create_group("taps"), group.create_group("crc32")
    targets: dict[str, h5py.Dataset] = {}
    for tap in teacher.taps:
        if layout == "virtual":
            _virtual_tap(output, taps, tap.name, tap.shape, tap.kind, stored["dtype"], shards)
        else:
            targets[tap.name] = create_tap_dataset(
                taps, tap, num_images, stored["dtype"], stored["compression"]
            )
    crc = {tap.name: np.zeros(num_images, dtype=np.uint32) for tap in teacher.taps}
    done = np.zeros(num_images, dtype=bool)
    pseudo = stored.get("pseudo_masks")
    masks = None
    if pseudo is not None and pseudo["teacher"] == teacher.name:
        masks = create_pseudo_mask_datasets(group, num_images)
    for shard, path in enumerate(shards):
        with open_read_only(path) as source:
            rows = slice(shard * shard_size, shard * shard_size + source["done"].shape[0])
            done[rows] = source["done"][()]
            for name, values in crc.items():
                values[rows] = source["crc32"][name][()]
                if name in targets:
                    _copy_chunks(source["taps"][name], targets[name], rows.start)
            if masks is not None:
                _copy_pseudo_masks(source, masks, rows)
    if not done.all():
        raise FeatureStoreError(
            f"{output.name}: a shard of teacher '{teacher.name}' has unfinished images "
            f"(first: {int(np.argmin(done))}); delete it and rerun the extraction"
        )
    for name, values in crc.items():
        checksums.create_dataset(name, data=values)
    group.create_dataset("done", data=done)
    decoder = decoder_path(output, teacher.name)
    if decoder.exists():
        with open_read_only(decoder) as source:
            copy_state_dict(source, group.create_group("decoder"))


def skipped_in_shards(
    output: Path, teachers: list[TeacherSpec], stored: Mapping[str, Any]
) -> np.ndarray:
    """Why each image was skipped ("": it was not), from the shards of every teacher: an
    image that one teacher's pass could not load, the others could not either."""
    shard_size = int(stored["shard_size"])
    skipped = np.full(int(stored["num_images"]), "", dtype=object)
    for teacher in teachers:
        for shard in range(shard_count(stored)):
            with open_read_only(shard_path(output, teacher.name, shard)) as source:
                reasons = read_skipped(source)
            rows = slice(shard * shard_size, shard * shard_size + len(reasons))
            skipped[rows] = np.where(skipped[rows] == "", reasons, skipped[rows])
    return skipped


def _copy_pseudo_masks(
    source: h5py.File, targets: tuple[h5py.Dataset, h5py.Dataset, h5py.Dataset], rows: slice
) -> None:
    """Copy a shard's pseudo-mask rows, their crc32 and counts (in either layout: they are
    small next to the features)."""
    texts, checksums, counts = targets
    texts[rows] = source[PSEUDO_MASKS].asstr()[()]
    checksums[rows] = source[PSEUDO_MASKS_CRC32][()]
    counts[rows] = source[PSEUDO_MASK_COUNTS][()]


def _copy_chunks(source: h5py.Dataset, target: h5py.Dataset, first_row: int) -> None:
    """Copy one-sample chunks as stored bytes: no decompression, bitwise identical."""
    zeros = (0,) * (source.ndim - 1)
    for row in range(source.shape[0]):
        filter_mask, chunk = source.id.read_direct_chunk((row, *zeros))
        target.id.write_direct_chunk((first_row + row, *zeros), chunk, filter_mask)


def _virtual_tap(
    output: Path,
    taps: h5py.Group,
    name: str,
    shape: tuple[int, ...],
    kind: str | None,
    dtype: str,
    shards: list[Path],
) -> None:
    """A virtual dataset over the shards, by paths relative to the output's folder.

    Unmapped or unreadable regions read as NaN rather than zeros, so a lost shard cannot pass
    for data; `FeatureStore` also checks that every source exists when it opens the file.
    """
    rows = [_shard_rows(path) for path in shards]
    layout = h5py.VirtualLayout(shape=(sum(rows), *shape), dtype=dtype)
    start = 0
    for path, count in zip(shards, rows, strict=True):
        relative = os.path.relpath(path, output.parent)
        layout[start : start + count] = h5py.VirtualSource(
            relative, f"taps/{name}", shape=(count, *shape), dtype=dtype
        )
        start += count
    dataset = taps.create_virtual_dataset(name, layout, fillvalue=np.nan)
    dataset.attrs["kind"] = str(kind)


def _shard_rows(path: Path) -> int:
    with open_read_only(path) as handle:
        return int(handle["done"].shape[0])
