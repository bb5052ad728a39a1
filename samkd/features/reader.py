"""Reading a feature file: random access by image, safe in DataLoader worker processes.

Every row read is checked against the crc32 stored with it at extraction (see
`samkd.features.schema`), so damaged features are never trained on: a mismatch raises
`FeatureChecksumError`, or under `on_error="skip"` the image is left out and listed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from loguru import logger
from zlib_ng import zlib_ng

from samkd.data.errors import OnError, check_on_error
from samkd.features.images import MAX_HASHED, changed_image
from samkd.features.layout import (
    PSEUDO_MASKS,
    PSEUDO_MASKS_CRC32,
    open_read_only,
    read_index_file,
    read_skipped_images,
)
from samkd.features.pseudo_masks import decode_rows
from samkd.features.rows import Descriptors, TapRows
from samkd.features.schema import (
    FILE_FORMAT,
    READABLE_SCHEMA_VERSIONS,
    FeatureStoreError,
    TapKind,
    TeacherSpec,
    parts_dir,
    teacher_from_json,
)

CHUNK_CACHE_BYTES = 4 << 20
TORCH_DTYPES = {np.dtype(np.float16): torch.float16, np.dtype(np.float32): torch.float32}


class FeatureChecksumError(FeatureStoreError):
    """A stored row whose bytes no longer match the crc32 written with them."""


def open_feature_file(path: Path) -> h5py.File:
    """Open read-only, turning a missing or unreadable file into a one-line FeatureStoreError."""
    path = Path(path)
    if not path.exists():
        if parts_dir(path).exists():
            raise FeatureStoreError(
                f"{path.name}: extraction not finished ({parts_dir(path).name} holds the parts); "
                "rerun the extraction"
            )
        raise FeatureStoreError(f"{path}: feature file does not exist")
    try:
        handle = open_read_only(path, rdcc_nbytes=CHUNK_CACHE_BYTES)
    except OSError as error:
        raise FeatureStoreError(f"{path.name}: not a readable HDF5 file ({error})") from None
    if handle.attrs.get("format") != FILE_FORMAT:
        handle.close()
        raise FeatureStoreError(f"{path.name}: not a samkd feature file")
    version = int(handle.attrs.get("schema_version", -1))
    if version not in READABLE_SCHEMA_VERSIONS:
        handle.close()
        readable = ", ".join(map(str, READABLE_SCHEMA_VERSIONS))
        raise FeatureStoreError(
            f"{path.name}: schema_version {version}, this samkd reads {readable}"
        )
    return handle


def missing_virtual_sources(path: Path, dataset: h5py.Dataset) -> list[str]:
    """Source files of a virtual dataset that do not exist (relative to the file's folder)."""
    if not dataset.is_virtual:
        return []
    names = {source.file_name for source in dataset.virtual_sources()}
    return sorted(name for name in names if not (Path(path).parent / name).exists())


def file_teachers(handle: h5py.File) -> list[TeacherSpec]:
    """The teachers of an open feature file, from its stored plan."""
    plan = json.loads(handle.attrs["plan"])
    return [teacher_from_json(record) for record in plan["teachers"]]


def flip_attention(tensor: torch.Tensor) -> torch.Tensor:
    """Mirror a `G^2 x G^2` coarse attention map left-right in both query and key grids."""
    side = math.isqrt(tensor.shape[-1])
    mirrored = torch.arange(side * side).view(side, side).flip(-1).reshape(-1)
    return tensor[..., mirrored, :][..., mirrored]


def flip_tap(tensor: torch.Tensor, kind: TapKind | None) -> torch.Tensor:
    """Horizontal flip of one image's tap, matching a horizontally flipped input image."""
    if kind == "spatial":
        return tensor.flip(-1)
    if kind == "attention":
        return flip_attention(tensor)
    return tensor


class FeatureStore:
    """Teacher features of a finished feature file, by image index or image id.

    `taps` selects the taps read: one list for every teacher, or a list per teacher name.
    `store[i]` is `{teacher: {tap: tensor}}` with each tensor shaped like the tap
    (e.g. 256 x 64 x 64), `dtype` float32 by default, or as stored with `dtype=None` (to
    move half the bytes and widen on the GPU). A row is read with one `pread` where it is
    one uncompressed chunk (`samkd.features.rows`), else through h5py. The HDF5 handle is
    opened lazily in each process (never shared across fork) and dropped when pickled, so
    the store can be (part of) a Dataset read by DataLoader workers. Files are opened
    without HDF5's file lock (`open_read_only`), so that many nodes read one file on shared
    storage.

    Each row read is checked against its stored crc32. A mismatch raises
    `FeatureChecksumError` naming the image, teacher and tap; under `on_error="skip"` the
    image reads as `{}` and its message is kept in `skipped_rows` (image id -> message, of
    this process: a DataLoader worker's are its own, so pass them on with the sample).
    `verify=False` skips the check, for files already checked by `samkd inspect --check`.

    `pseudo_masks(i)` reads the teacher automatic masks of an image, when the file has them
    (`samkd extract --pseudo-masks`; `pseudo_mask_teacher` names their teacher, whichever
    `teachers` are selected), checked against their crc32 in the same way.
    """

    def __init__(
        self,
        path: Path,
        teachers: Sequence[str] | None = None,
        taps: Sequence[str] | Mapping[str, Sequence[str]] | None = None,
        dtype: torch.dtype | None = torch.float32,
        on_error: OnError = "raise",
        verify: bool = True,
    ):
        self.path = Path(path)
        self.dtype = dtype
        self.on_error = check_on_error(on_error)
        self.verify = verify
        self.skipped_rows: dict[str, str] = {}
        with open_feature_file(self.path) as handle:
            self.teachers = _select_teachers(self.path, file_teachers(handle), teachers, taps)
            self.image_ids: list[str] = list(handle["images/ids"].asstr()[()])
            self.image_sizes = handle["images/original_sizes"][()]
            self.image_hashes = [h.decode("ascii") for h in handle["images/sha256"][()]]
            self.preprocessing = json.loads(handle["images"].attrs["preprocessing"])
            self._skipped_images = read_skipped_images(handle["images"])
            # Read here, once: DataLoader workers inherit (or unpickle) them.
            self._taps = _stored_taps(self.path, handle, self.teachers)
            self.pseudo_mask_teacher = _pseudo_mask_teacher(self.path, handle)
            self._pseudo_mask_checksums = None
            if self.pseudo_mask_teacher is not None:
                group = handle["teachers"][self.pseudo_mask_teacher]
                self._pseudo_mask_checksums = group[PSEUDO_MASKS_CRC32][()]
        self._positions: dict[str, int] | None = None
        # Per process, opened only to read what no pread can (see `_dataset`): never shared
        # across fork, dropped when pickled. Rows read with a pread need no HDF5 handle.
        self._handle: h5py.File | None = None
        self._datasets: dict[str, h5py.Dataset] = {}
        self._pid: int | None = None
        self._descriptors = Descriptors()

    @property
    def skipped_images(self) -> dict[int, str]:
        """Images that extraction could not read (`data.on_error=skip`), index -> why: their
        features are zeros, to be left out of training."""
        return dict(self._skipped_images)

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int | str) -> dict[str, dict[str, torch.Tensor]]:
        return self.read(index)

    def index_of(self, image_id: str) -> int:
        if self._positions is None:
            self._positions = {image_id: i for i, image_id in enumerate(self.image_ids)}
        if image_id not in self._positions:
            raise KeyError(f"{self.path.name}: no image '{image_id}'")
        return self._positions[image_id]

    def read(self, index: int | str, flip: bool = False) -> dict[str, dict[str, torch.Tensor]]:
        """`{teacher: {tap: tensor}}` of one image; `flip` mirrors them horizontally.

        `{}` for an image whose stored features fail their checksum under `on_error="skip"`.
        """
        row = self._row(index)
        image_id = self.image_ids[row]
        if image_id in self.skipped_rows:
            return {}
        try:
            return self._read_features(row, flip)
        except FeatureChecksumError as error:
            self._skip(image_id, error)
            return {}

    def prefetch(self, images: Sequence[int | str]) -> None:
        """Ask the disk now for the rows of `images` (indices or ids) that will be read next:
        a batch's reads then wait for the disk together rather than one after the other.
        Only a hint (`posix_fadvise`): nothing is read or checked here."""
        rows = [self._row(image) for image in images]
        for tap in self._taps.values():
            tap.rows.advise(rows, self._descriptors)

    def pseudo_masks(self, index: int | str) -> list[dict[str, Any]]:
        """The teacher automatic masks of one image (see `samkd.features.pseudo_masks`):
        COCO RLE records at the original image size, highest predicted IoU first; `[]` for
        an image without any, or skipped at extraction.

        A row that fails its crc32 raises `FeatureChecksumError`; under `on_error="skip"`
        the image joins `skipped_rows` (its features then read as `{}`) and this is `[]`.
        """
        if self.pseudo_mask_teacher is None:
            raise no_pseudo_masks(self.path)
        row = self._row(index)
        image_id = self.image_ids[row]
        if image_id in self.skipped_rows:
            return []
        data = bytes(self._dataset(f"teachers/{self.pseudo_mask_teacher}/{PSEUDO_MASKS}")[row])
        assert self._pseudo_mask_checksums is not None
        try:
            if self.verify:
                self._check_pseudo_masks(data, int(self._pseudo_mask_checksums[row]), row)
        except FeatureChecksumError as error:
            self._skip(image_id, error)
            return []
        try:
            return decode_rows([data])[0]
        except ValueError as error:
            raise FeatureStoreError(
                f"{self.path.name}: teacher '{self.pseudo_mask_teacher}' image '{image_id}': "
                f"{error}"
            ) from None

    def _row(self, index: int | str) -> int:
        """The row of an image index (negative from the end) or id."""
        row = self.index_of(index) if isinstance(index, str) else int(index)
        if not -len(self) <= row < len(self):
            raise IndexError(f"{self.path.name}: image {index} out of range ({len(self)} images)")
        return row % len(self)

    def _skip(self, image_id: str, error: FeatureChecksumError) -> None:
        """Raise `error`, or under on_error="skip" leave the image out and log why."""
        if self.on_error == "raise":
            raise error
        self.skipped_rows[image_id] = str(error)
        logger.warning("{} (image skipped)", error)

    def _check_pseudo_masks(self, data: bytes, stored: int, row: int) -> None:
        read = zlib_ng.crc32(data)
        if read != stored:
            name = self.path.name
            raise FeatureChecksumError(
                f"{name}: teacher '{self.pseudo_mask_teacher}' pseudo-masks of image "
                f"'{self.image_ids[row]}': checksum mismatch (stored crc32 {stored:08x}, read "
                f"{read:08x}): the file is damaged; `samkd inspect --check {name}` lists every "
                "damaged image; delete it (and its .parts folder) and rerun `samkd extract`, "
                "or set data.on_error=skip to train without them"
            )

    def _read_features(self, row: int, flip: bool) -> dict[str, dict[str, torch.Tensor]]:
        """Every selected tap of one row, each checked before it is converted."""
        features: dict[str, dict[str, torch.Tensor]] = {}
        for teacher in self.teachers:
            features[teacher.name] = {}
            for tap in teacher.taps:
                key = teacher.name, tap.name
                stored_dtype = self._taps[key].dtype
                widened = self.dtype not in (None, stored_dtype)
                # As stored, into the output itself unless it is to be widened.
                stored = output_tensor(tap.shape, stored_dtype, shared=not widened)
                self._read_row(key, row, stored.numpy())
                if self.verify:
                    self._check_row(stored.numpy(), key, row)
                tensor = stored
                if widened:
                    assert self.dtype is not None
                    tensor = output_tensor(tap.shape, self.dtype)
                    tensor.copy_(stored)  # torch widens float16 several times faster than numpy
                features[teacher.name][tap.name] = flip_tap(tensor, tap.kind) if flip else tensor
        return features

    def _check_row(self, values: np.ndarray, key: tuple[str, str], row: int) -> None:
        """Raise FeatureChecksumError when the bytes read differ from those extracted."""
        stored = int(self._taps[key].checksums[row])
        read = crc32(values)
        if read != stored:
            teacher, tap = key
            name = self.path.name
            raise FeatureChecksumError(
                f"{name}: teacher '{teacher}' tap '{tap}' image '{self.image_ids[row]}': "
                f"checksum mismatch (stored crc32 {stored:08x}, read {read:08x}): the file is "
                f"damaged; `samkd inspect --check {name}` lists every damaged image; delete "
                "it (and its .parts folder) and rerun `samkd extract`, or set "
                "data.on_error=skip to train without them"
            )

    def check_matches(
        self,
        image_ids: Sequence[str] | None = None,
        image_size: int | None = None,
        preprocessing: Mapping[str, Any] | None = None,
        teachers: Sequence[str] | None = None,
        taps: Sequence[str] | None = None,
        image_hashes: Sequence[str] | None = None,
        image_files: Sequence[Path] | None = None,
    ) -> None:
        """Raise a one-line FeatureStoreError naming the first thing that differs.

        `image_files` (one per stored image, in order) checks that the files are those the
        features were computed from: each file's size and mtime against those stored, and
        the sha256 of the files whose mtime changed, at most `MAX_HASHED` of them (see
        `samkd.features.images`): a stat of every file, and at most about 1 GB read.
        """
        name = self.path.name
        if image_ids is not None:
            if len(image_ids) != len(self.image_ids):
                raise FeatureStoreError(
                    f"{name}: holds {len(self.image_ids)} images, the dataset has {len(image_ids)}"
                )
            for i, (stored, wanted) in enumerate(zip(self.image_ids, image_ids, strict=True)):
                if stored != wanted:
                    raise FeatureStoreError(
                        f"{name}: image {i} is '{stored}' in the file, '{wanted}' in the dataset"
                    )
        if image_hashes is not None:
            for i, (stored, wanted) in enumerate(zip(self.image_hashes, image_hashes, strict=True)):
                if stored != wanted:
                    raise FeatureStoreError(
                        f"{name}: image '{self.image_ids[i]}' has changed since extraction "
                        f"(sha256 {stored[:12]}..., now {wanted[:12]}...)"
                    )
        if image_files is not None:
            if len(image_files) != len(self.image_ids):
                raise FeatureStoreError(
                    f"{name}: holds {len(self.image_ids)} images, the dataset has "
                    f"{len(image_files)}"
                )
            records = read_index_file(self.path)
            difference = changed_image(records, image_files, max_hashed=MAX_HASHED)
            if difference is not None:
                raise FeatureStoreError(f"{name}: {difference}")
        names = [teacher.name for teacher in self.teachers]
        for wanted_teacher in teachers or ():
            if wanted_teacher not in names:
                raise FeatureStoreError(f"{name}: no teacher '{wanted_teacher}' (has {names})")
        for teacher in self.teachers:
            if image_size is not None and teacher.image_size != image_size:
                raise FeatureStoreError(
                    f"{name}: teacher '{teacher.name}' was extracted with image_size "
                    f"{teacher.image_size}, now {image_size}"
                )
            for tap in taps or ():
                if tap not in teacher.tap_names:
                    raise FeatureStoreError(
                        f"{name}: teacher '{teacher.name}' has no tap '{tap}' "
                        f"(has {teacher.tap_names})"
                    )
        if preprocessing is not None:
            wanted = json.loads(json.dumps(dict(preprocessing), sort_keys=True))
            for key in sorted(set(wanted) | set(self.preprocessing)):
                if wanted.get(key) != self.preprocessing.get(key):
                    raise FeatureStoreError(
                        f"{name}: preprocessing {key} was {self.preprocessing.get(key)} at "
                        f"extraction, now {wanted.get(key)}"
                    )

    def close(self) -> None:
        if self._handle is not None and self._pid == os.getpid():
            self._handle.close()
        self._descriptors.close()
        self.__dict__.update(_unopened())

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, **_unopened()}

    def _dataset(self, name: str) -> h5py.Dataset:
        """A dataset of this process's HDF5 handle, opened on first use (a path lookup in
        h5py costs about as much as reading a small tap: each is looked up once)."""
        if self._handle is None or self._pid != os.getpid():
            self._handle = open_feature_file(self.path)
            self._pid = os.getpid()
            self._datasets = {}
        if name not in self._datasets:
            self._datasets[name] = self._handle[name]
        return self._datasets[name]

    def _read_row(self, key: tuple[str, str], row: int, out: np.ndarray) -> None:
        """One image's tap as stored, into `out`: with one pread where the row is one
        uncompressed chunk (`samkd.features.rows`), else through h5py."""
        if not self._taps[key].rows.read_into(row, out, self._descriptors):
            teacher, tap = key
            self._dataset(f"teachers/{teacher}/taps/{tap}").read_direct(out, np.s_[row], np.s_[...])


def _unopened() -> dict[str, Any]:
    """A FeatureStore's per-process state before it opens its file in a process."""
    return {
        "_handle": None,
        "_datasets": {},
        "_pid": None,
    }


def crc32(values: np.ndarray) -> int:
    """The crc32 of an array's bytes, as the writer stores it (`zlib.crc32`): zlib-ng's gives
    the same values at about 6x the speed (15 GB/s against 2.5 here), which keeps checking
    every row cheaper than reading it."""
    return zlib_ng.crc32(values)


def output_tensor(shape: Sequence[int], dtype: torch.dtype, shared: bool = True) -> torch.Tensor:
    """An empty tensor for one tap; in a DataLoader worker (and `shared`), in shared memory,
    which a worker would otherwise copy it to in order to pass it on (as torch's own
    `default_collate` allocates its batches there): one copy of every tap fewer per image."""
    if not shared or torch.utils.data.get_worker_info() is None:
        return torch.empty(tuple(shape), dtype=dtype)
    storage = torch.UntypedStorage._new_shared(math.prod(shape) * dtype.itemsize)
    return torch.empty(0, dtype=dtype).set_(storage).view(tuple(shape))


def _select_teachers(
    path: Path,
    available: list[TeacherSpec],
    teachers: Sequence[str] | None,
    tap_selection: Sequence[str] | Mapping[str, Sequence[str]] | None,
) -> list[TeacherSpec]:
    by_name = {teacher.name: teacher for teacher in available}
    selected = []
    for name in teachers if teachers is not None else list(by_name):
        if name not in by_name:
            raise FeatureStoreError(f"{path.name}: no teacher '{name}' (has {list(by_name)})")
        teacher = by_name[name]
        taps = tap_selection.get(name) if isinstance(tap_selection, Mapping) else tap_selection
        if taps is not None:
            missing = [tap for tap in taps if tap not in teacher.tap_names]
            if missing:
                raise FeatureStoreError(
                    f"{path.name}: teacher '{name}' has no tap '{missing[0]}' "
                    f"(has {teacher.tap_names})"
                )
            chosen = tuple(teacher.tap(tap) for tap in taps)
            teacher = dataclasses.replace(teacher, taps=chosen)
        selected.append(teacher)
    return selected


def no_pseudo_masks(path: Path) -> FeatureStoreError:
    """The error of reading pseudo-masks from a file that has none."""
    return FeatureStoreError(
        f"{path}: holds no pseudo-masks; make them with `samkd extract --pseudo-masks` "
        "(into a new output, or delete this one)"
    )


def _pseudo_mask_teacher(path: Path, handle: h5py.File) -> str | None:
    """The teacher whose pseudo-masks the file holds (None: it holds none), once checked that
    they are there."""
    record = json.loads(handle.attrs["plan"]).get("pseudo_masks")
    if record is None:
        return None
    teacher = str(record["teacher"])
    group = handle["teachers"].get(teacher)
    names = (PSEUDO_MASKS, PSEUDO_MASKS_CRC32)
    missing = [name for name in names if group is None or name not in group]
    if missing:
        raise FeatureStoreError(
            f"{path.name}: the plan has pseudo-masks of teacher '{teacher}', but "
            f"/teachers/{teacher}/{missing[0]} is missing"
        )
    return teacher


@dataclass(frozen=True)
class _StoredTap:
    """A selected tap of a file: its dtype, where its rows are, and their crc32s."""

    dtype: torch.dtype
    rows: TapRows
    checksums: np.ndarray


def _stored_taps(
    path: Path, handle: h5py.File, teachers: Sequence[TeacherSpec]
) -> dict[tuple[str, str], _StoredTap]:
    """Refuse incomplete files and lost shards; each selected tap's rows and checksums."""
    taps: dict[tuple[str, str], _StoredTap] = {}
    for teacher in teachers:
        group = handle["teachers"][teacher.name]
        done = group["done"][()]
        if not done.all():
            raise FeatureStoreError(
                f"{path.name}: teacher '{teacher.name}' has {int((~done).sum())} of "
                f"{done.size} images unfinished; rerun the extraction"
            )
        for tap in teacher.taps:
            dataset = group["taps"][tap.name]
            missing = missing_virtual_sources(path, dataset)
            if missing:
                raise FeatureStoreError(
                    f"{path.name}: shard {missing[0]} is missing "
                    f"({len(missing)} in all for teacher '{teacher.name}' tap '{tap.name}')"
                )
            taps[teacher.name, tap.name] = _StoredTap(
                TORCH_DTYPES[dataset.dtype], TapRows(path, dataset), group["crc32"][tap.name][()]
            )
    return taps


def read_decoder_state_dict(path: Path, teacher: str) -> dict[str, torch.Tensor]:
    """The teacher's `prompt_encoder.*` and `mask_decoder.*` weights stored in the file."""
    path = Path(path)
    with open_feature_file(path) as handle:
        if teacher not in handle["teachers"]:
            raise FeatureStoreError(
                f"{path.name}: no teacher '{teacher}' (has {list(handle['teachers'])})"
            )
        group = handle["teachers"][teacher]
        if "decoder" not in group:
            raise FeatureStoreError(f"{path.name}: no decoder weights stored for '{teacher}'")
        return {key: torch.from_numpy(group["decoder"][key][()]) for key in group["decoder"]}
