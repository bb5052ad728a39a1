"""Writing teacher features: resumable, crash-safe shards filled by a background thread.

    writer = open_for_extraction(Path("features.h5"), plan)
    print(writer.message)                        # planned size, resuming, or nothing to do
    writer.write_decoder_state("vit_h", sam.state_dict())
    for indices in batches_of(writer.todo("vit_h")):
        writer.write_batch("vit_h", indices, {"encoder.embed": embed})   # B x 256 x 64 x 64
    writer.finish()                              # joins the shards into features.h5

The teacher of the plan's pseudo-masks passes each image's masks with its features
(`write_batch(..., pseudo_masks=[masks of each image])`, see `samkd.features.pseudo_masks`):
they are written in the same rows of the same shards, and resume the same way.

Each shard (`shard_size` consecutive images of one teacher) is written to a temporary file
and renamed to `<output>.parts/<teacher>/part-XXXXX.h5` once all its images are on disk, so a
process killed at any moment (SIGKILL included, during a flush included) leaves only complete
shards under their final names; the rerun deletes the stale temporary files and recomputes
the unfinished shards, which ends bitwise identical to an uninterrupted run when the teacher
is deterministic. Under torchrun each rank writes the shards `rank, rank + world_size, ...`
and leaves; rank 0, out of the process group (so that no rank waits in a collective, whose
timeout a long wait or copy would hit), waits for every shard on disk and calls `join_shards`.
A join killed midway leaves only a temporary file, which the rerun deletes before joining.
One extraction writes an output at a time: rank 0 holds its lock (`samkd.features.lock`), and
only the holder deletes what killed writers left. The free space is checked against all that
is left to write (`space_needed`); a disk that fills up anyway gives a one-line
`StorageError`, and the file being written is deleted.
"""

from __future__ import annotations

import json
import queue
import shutil
import threading
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from samkd.features.images import checkpoint_paths
from samkd.features.join import join_shards
from samkd.features.layout import (
    STRING,
    create_pseudo_mask_datasets,
    create_tap_dataset,
    discard_hdf5,
    open_read_only,
    read_index_file,
    utc_now,
    write_index_file,
    write_state_dict_file,
)
from samkd.features.lock import output_lock
from samkd.features.pseudo_masks import encode_rows
from samkd.features.schema import (
    FLOAT16_MAX,
    ExtractionPlan,
    FeatureStoreError,
    JoinLayout,
    TeacherSpec,
    decoder_path,
    describe_difference,
    first_image_difference,
    parts_dir,
    planned_bytes,
    pseudo_mask_bytes,
    shard_path,
    storage_itemsize,
)
from samkd.features.storage import (
    StorageError,
    describe_storage_failure,
    free_bytes,
    storage_errno,
    storage_errors,
)
from samkd.files import atomic_path, existing_folder, format_bytes, publish, temporary_path
from samkd.models.registry import DECODER_PREFIXES, SAM2_DECODER_PREFIXES

ArrayLike = np.ndarray | torch.Tensor
ProgressCallback = Callable[[str, int], None]
# One image's pseudo-masks as stored: its JSON string and its number of masks.
PseudoMaskRow = tuple[str, int]
# (teacher, image indices, features by tap, why each image was skipped or None, the
# pseudo-mask row of each image or None)
QueueItem = tuple[
    str, Sequence[int], dict[str, np.ndarray], Sequence[str] | None, Sequence[PseudoMaskRow] | None
]


@dataclass(frozen=True)
class FeatureBatch:
    """Features of one teacher for a batch: `features[tap]` is `B x *tap_shape`; for the
    plan's pseudo-mask teacher, `pseudo_masks` holds each image's masks."""

    teacher: str
    indices: Sequence[int]
    features: Mapping[str, ArrayLike]
    pseudo_masks: Sequence[Sequence[Mapping[str, Any]]] | None = None


# --------------------------------------------------------------------------- values


def to_numpy(array: ArrayLike) -> np.ndarray:
    """A CPU numpy view (bfloat16 tensors become float32, numpy has no bfloat16)."""
    if isinstance(array, torch.Tensor):
        tensor = array.detach().to("cpu")
        if tensor.dtype == torch.bfloat16:
            tensor = tensor.float()
        return tensor.numpy()
    return np.asarray(array)


def stored_sample(
    sample: np.ndarray, plan: ExtractionPlan, teacher: str, tap: str, image_index: int
) -> np.ndarray:
    """`sample` cast to the storage dtype, refusing non-finite or out-of-range values.

    Raises FeatureStoreError naming teacher, tap, image id and the offending value, unless
    the plan allows it (`allow_nonfinite`, `allow_overflow`).
    """
    with np.errstate(over="ignore"):  # overflow becomes inf, refused below unless allowed
        stored = sample.astype(plan.dtype)
    if plan.allow_nonfinite and plan.allow_overflow:
        return stored
    finite = np.isfinite(sample)
    where = f"teacher '{teacher}' tap '{tap}' image '{plan.images[image_index].id}'"
    if not plan.allow_nonfinite and not finite.all():
        value = sample[~finite].flat[0]
        raise FeatureStoreError(
            f"{where}: value {value} is not finite; set extract.allow_nonfinite to store it"
        )
    if plan.dtype == "float16" and not plan.allow_overflow:
        beyond = finite & (np.abs(sample) > FLOAT16_MAX)
        if beyond.any():
            value = sample[beyond].flat[0]
            raise FeatureStoreError(
                f"{where}: value {value:.6g} is beyond the float16 range (+-{FLOAT16_MAX:.0f}); "
                "set extract.allow_overflow to store it as inf, or extract.dtype=float32"
            )
    return stored


def decoder_state(state_dict: Mapping[str, ArrayLike]) -> dict[str, np.ndarray]:
    """The `prompt_encoder.*` and `mask_decoder.*` entries of a SAM state dict (a SAM 2 one's
    `sam_prompt_encoder.*` and `sam_mask_decoder.*`), as numpy."""
    state = {
        key: to_numpy(value).copy()
        for key, value in state_dict.items()
        if key.startswith(DECODER_PREFIXES + SAM2_DECODER_PREFIXES)
    }
    if not state:
        raise FeatureStoreError(
            "decoder state: no prompt_encoder.* or mask_decoder.* keys in the state dict"
        )
    return state


# --------------------------------------------------------------------------- shards


class _OpenShard:
    """A shard being written under a temporary name; published when every image is done."""

    def __init__(self, output: Path, plan: ExtractionPlan, teacher: TeacherSpec, shard: int):
        self.final_path = shard_path(output, teacher.name, shard)
        self.path = temporary_path(self.final_path)
        self.images = plan.shard_range(shard)
        self.done = np.zeros(len(self.images), dtype=bool)
        try:
            self.file = h5py.File(self.path, "w")
        except BaseException:
            self.path.unlink(missing_ok=True)  # created, then failing to write its header
            raise
        try:
            self._create_datasets(plan, teacher, shard)
        except BaseException:
            self.discard()
            raise

    def _create_datasets(self, plan: ExtractionPlan, teacher: TeacherSpec, shard: int) -> None:
        """Create the layout and keep a handle on each dataset: a dataset object dropped
        after each write would be closed then, flushing its cache; on a full disk that
        close fails, and HDF5 crashes at exit on the dataset it failed to close."""
        self.file.attrs["teacher"] = teacher.name
        self.file.attrs["shard"] = shard
        self.file.attrs["start"] = self.images.start
        self.file.attrs["stop"] = self.images.stop
        taps, checksums = self.file.create_group("taps"), self.file.create_group("crc32")
        rows = len(self.images)
        self.taps = {
            tap.name: create_tap_dataset(taps, tap, rows, plan.dtype, plan.compression)
            for tap in teacher.taps
        }
        self.checksums = {
            tap.name: checksums.create_dataset(tap.name, shape=(rows,), dtype=np.uint32)
            for tap in teacher.taps
        }
        self.done_flags = self.file.create_dataset("done", shape=(rows,), dtype=bool)
        self.skipped = self.file.create_dataset("skipped", shape=(rows,), dtype=STRING)
        self.pseudo_masks = None
        if plan.pseudo_mask_teacher == teacher.name:
            self.pseudo_masks = create_pseudo_mask_datasets(self.file, rows)

    def write(self, local: int, tap: str, sample: np.ndarray) -> None:
        self.taps[tap][local] = sample
        self.checksums[tap][local] = zlib.crc32(np.ascontiguousarray(sample).data)

    def write_pseudo_masks(self, local: int, row: PseudoMaskRow) -> None:
        assert self.pseudo_masks is not None, "the plan stores no pseudo-masks of this teacher"
        texts, checksums, counts = self.pseudo_masks
        text, count = row
        texts[local] = text
        checksums[local] = zlib.crc32(text.encode("utf-8"))
        counts[local] = count

    def mark_skipped(self, local: int, reason: str) -> None:
        self.skipped[local] = reason

    def mark_done(self, local_indices: Sequence[int]) -> None:
        """Set the completion flags, after the data of these images was flushed."""
        self.done[list(local_indices)] = True
        self.done_flags[:] = self.done
        self.file.flush()

    @property
    def complete(self) -> bool:
        return bool(self.done.all())

    def publish(self) -> None:
        self.file.close()
        publish(self.path, self.final_path)

    def discard(self) -> None:
        """Close and delete the temporary file, even on a full disk."""
        discard_hdf5(self.file, self.path)


class _ShardSink:
    """Writes batches into shards; runs on the writer thread only."""

    def __init__(self, output: Path, plan: ExtractionPlan, on_progress: ProgressCallback | None):
        self.output, self.plan, self.on_progress = output, plan, on_progress
        self.open: dict[tuple[str, int], _OpenShard] = {}

    def write(
        self,
        teacher: str,
        indices: Sequence[int],
        features: Mapping[str, np.ndarray],
        skipped: Sequence[str] | None = None,
        pseudo_masks: Sequence[PseudoMaskRow] | None = None,
    ) -> None:
        spec = self.plan.teacher(teacher)
        touched: dict[tuple[str, int], list[int]] = {}
        for position, index in enumerate(indices):
            shard = self._shard(spec, index // self.plan.shard_size)
            local = index - shard.images.start
            for tap in spec.taps:
                sample = stored_sample(
                    features[tap.name][position], self.plan, teacher, tap.name, index
                )
                shard.write(local, tap.name, sample)
            if skipped is not None:
                shard.mark_skipped(local, skipped[position])
            if pseudo_masks is not None:
                shard.write_pseudo_masks(local, pseudo_masks[position])
            touched.setdefault((teacher, index // self.plan.shard_size), []).append(local)
        for key in touched:
            self.open[key].file.flush()
        for key, local_indices in touched.items():
            shard = self.open[key]
            shard.mark_done(local_indices)
            if shard.complete:
                shard.publish()
                del self.open[key]
        if self.on_progress is not None:
            self.on_progress(teacher, len(indices))

    def _shard(self, teacher: TeacherSpec, shard: int) -> _OpenShard:
        key = (teacher.name, shard)
        if key not in self.open:
            self.open[key] = _OpenShard(self.output, self.plan, teacher, shard)
        return self.open[key]

    def discard(self) -> None:
        for shard in self.open.values():
            shard.discard()
        self.open.clear()


# --------------------------------------------------------------------------- writer


class FeatureWriter:
    """Accepts teacher features batch by batch and writes them on a background thread.

    Create with `open_for_extraction`. `write_batch` returns once the batch is queued; a
    failure on the writer thread is raised by the next `write_batch` or `finish`.
    """

    def __init__(
        self,
        output: Path,
        plan: ExtractionPlan,
        pending: Mapping[str, Sequence[int]],
        message: str,
        rank: int = 0,
        world_size: int = 1,
        layout: JoinLayout = "copy",
        queue_size: int = 4,
        on_progress: ProgressCallback | None = None,
        held: ExitStack | None = None,
    ):
        self.output, self.plan, self.message = output, plan, message
        self.rank, self.world_size, self.layout = rank, world_size, layout
        self._pending = {teacher: dict.fromkeys(indices) for teacher, indices in pending.items()}
        self._queue: queue.Queue[QueueItem | None] = queue.Queue(maxsize=queue_size)
        self._held = held or ExitStack()  # the output's lock, released by `close`
        self._sink = _ShardSink(output, plan, on_progress)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="samkd-feature-writer", daemon=True)
        self._thread.start()

    @property
    def nothing_to_do(self) -> bool:
        """True when this rank has no image left to write."""
        return not any(self._pending.values())

    def todo(self, teacher: str) -> list[int]:
        """Image indices that this rank still has to compute for `teacher`, ascending."""
        self.plan.teacher(teacher)
        return list(self._pending.get(teacher, ()))

    def write_decoder_state(self, teacher: str, state_dict: Mapping[str, ArrayLike]) -> None:
        """Store the teacher's `prompt_encoder.*` / `mask_decoder.*` weights (rank 0 only)."""
        self.plan.teacher(teacher)
        path = decoder_path(self.output, teacher)
        if self.rank == 0 and not path.exists() and not self.output.exists():
            with storage_errors(self.output):
                write_state_dict_file(path, decoder_state(state_dict))

    def write_batch(
        self,
        teacher: str,
        indices: Sequence[int],
        features: Mapping[str, ArrayLike],
        pseudo_masks: Sequence[Sequence[Mapping[str, Any]]] | None = None,
    ) -> None:
        """Queue `features[tap]` (`len(indices) x *tap_shape`) for the images `indices`, and
        for the plan's pseudo-mask teacher (only), `pseudo_masks`: each image's list of masks
        (see `samkd.features.pseudo_masks.generate_pseudo_masks`)."""
        self._raise_if_failed()
        spec = self.plan.teacher(teacher)
        indices = [int(index) for index in indices]
        if set(features) != set(spec.tap_names):
            raise FeatureStoreError(
                f"teacher '{teacher}': got taps {sorted(features)}, the plan has {spec.tap_names}"
            )
        arrays = {tap: to_numpy(value) for tap, value in features.items()}
        for tap in spec.taps:
            expected = (len(indices), *tap.shape)
            if arrays[tap.name].shape != expected:
                raise FeatureStoreError(
                    f"teacher '{teacher}' tap '{tap.name}': got shape "
                    f"{tuple(arrays[tap.name].shape)}, expected {expected}"
                )
        rows = self._pseudo_mask_rows(teacher, indices, pseudo_masks)
        self._take_pending(teacher, indices)
        self._put((teacher, indices, arrays, None, rows))

    def write_skipped(self, teacher: str, indices: Sequence[int], reasons: Sequence[str]) -> None:
        """Record images that could not be loaded (`data.on_error=skip`) as done, with zero
        features (and no pseudo-masks), and why in the shard's `skipped` (the file's
        `/images/skipped`): the image index keeps its rows, so that it still matches the
        dataset's records."""
        self._raise_if_failed()
        spec = self.plan.teacher(teacher)
        indices = [int(index) for index in indices]
        if len(reasons) != len(indices) or not all(reasons):
            raise FeatureStoreError(f"teacher '{teacher}': one non-empty reason per skipped image")
        none: list[list[dict[str, Any]]] | None = None
        if teacher == self.plan.pseudo_mask_teacher:
            none = [[] for _ in indices]
        rows = self._pseudo_mask_rows(teacher, indices, none)
        self._take_pending(teacher, indices)
        zeros = {
            tap.name: np.zeros((len(indices), *tap.shape), dtype=self.plan.dtype)
            for tap in spec.taps
        }
        self._put((teacher, indices, zeros, list(reasons), rows))

    def _pseudo_mask_rows(
        self,
        teacher: str,
        indices: Sequence[int],
        masks: Sequence[Sequence[Mapping[str, Any]]] | None,
    ) -> list[PseudoMaskRow] | None:
        """The stored rows of `masks` (one list per image), checked against the plan: only
        its pseudo-mask teacher has them, at most `max_masks` each, at each image's size."""
        if teacher != self.plan.pseudo_mask_teacher:
            if masks is not None:
                raise FeatureStoreError(
                    f"teacher '{teacher}': the plan stores no pseudo-masks of this teacher"
                )
            return None
        if masks is None or len(masks) != len(indices):
            got = "none" if masks is None else f"{len(masks)} lists"
            raise FeatureStoreError(
                f"teacher '{teacher}': expected one list of pseudo-masks per image "
                f"({len(indices)}), got {got}"
            )
        for index, image_masks in zip(indices, masks, strict=True):
            image = self.plan.images[index]
            if len(image_masks) > self.plan.max_masks:
                raise FeatureStoreError(
                    f"teacher '{teacher}' image '{image.id}': {len(image_masks)} pseudo-masks, "
                    f"more than max_masks {self.plan.max_masks}"
                )
            for mask in image_masks:
                if list(mask.get("size", ())) != [image.height, image.width]:
                    raise FeatureStoreError(
                        f"teacher '{teacher}' image '{image.id}': pseudo-mask of size "
                        f"{mask.get('size')}, the image is {[image.height, image.width]}"
                    )
        try:
            texts = encode_rows(masks)
        except ValueError as error:
            raise FeatureStoreError(f"teacher '{teacher}': {error}") from None
        return [(text, len(image_masks)) for text, image_masks in zip(texts, masks, strict=True)]

    def _take_pending(self, teacher: str, indices: Sequence[int]) -> None:
        pending = self._pending[teacher]
        for index in indices:
            if index not in pending:
                raise FeatureStoreError(
                    f"teacher '{teacher}': image {index} is not pending on rank {self.rank} "
                    "(already written, or another rank's)"
                )
        for index in indices:
            del pending[index]

    def drain(self) -> None:
        """Block until every queued batch is on disk (raises the writer thread's error)."""
        if self._thread.is_alive():
            self._queue.join()
        self._raise_if_failed()

    def finish(self, join: bool | None = None) -> Path | None:
        """Wait for the writer thread; join the shards (default: when world_size == 1).

        Returns the output path when it was joined (or already existed), else None.
        """
        self._stop()
        self._raise_if_failed()
        for teacher, pending in self._pending.items():
            if pending:
                first = self.plan.images[next(iter(pending))].id
                raise FeatureStoreError(
                    f"{self.output.name}: {len(pending)} images of teacher '{teacher}' were "
                    f"never written on rank {self.rank} (first: '{first}')"
                )
        if self.output.exists():
            return self.output
        if join is None:
            join = self.world_size == 1
        if not join:
            return None
        with storage_errors(self.output):
            return join_shards(self.output, layout=self.layout)

    def close(self) -> None:
        """Stop the writer thread, drop unfinished shards (complete ones stay), and release
        the output's lock if this writer took it."""
        try:
            self._stop()
            self._sink.discard()
        finally:
            self._held.close()

    def __enter__(self) -> FeatureWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _put(self, item: QueueItem | None) -> None:
        while True:
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                self._raise_if_failed()

    def _stop(self) -> None:
        if self._thread.is_alive():
            self._put(None)
            self._thread.join()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            found = storage_errno(self._error, self.output)
            if found is not None:
                raise StorageError(describe_storage_failure(self.output, *found)) from self._error
            if isinstance(self._error, FeatureStoreError):
                raise FeatureStoreError(f"{self.output.name}: {self._error}")
            raise FeatureStoreError(
                f"{self.output.name}: writer failed: {type(self._error).__name__}: {self._error}"
            ) from self._error

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                if self._error is None:
                    self._sink.write(*item)
            except BaseException as error:  # reported to the caller by _raise_if_failed
                self._error = error
                self._sink.discard()
            finally:
                self._queue.task_done()


def extract_features(batches: Iterable[FeatureBatch], writer: FeatureWriter) -> Path | None:
    """Write every batch, then `writer.finish()`; drops unfinished shards on failure."""
    with writer:
        for batch in batches:
            writer.write_batch(batch.teacher, batch.indices, batch.features, batch.pseudo_masks)
        return writer.finish()


# --------------------------------------------------------------------------- opening


# HDF5's bytes beyond the data, measured and then doubled: per file (superblock, groups,
# attributes), per dataset (object header) and per chunk (its index entry); plus the last,
# partly filled block of each file, and an image's entry in a `skipped` list.
FILE_OVERHEAD = 64 << 10
DATASET_OVERHEAD = 4 << 10
CHUNK_OVERHEAD = 128
BLOCK = 4 << 10
SKIPPED_BYTES = 32


@dataclass(frozen=True)
class SpaceNeeded:
    """Bytes an extraction has still to write on the output's disk: the teachers' decoders,
    the shards not on disk yet, and the joined output, which exists beside every shard
    until the parts folder is removed (a `virtual` join holds no feature data)."""

    decoders: int = 0
    shards: int = 0
    joined: int = 0

    @property
    def total(self) -> int:
        return self.decoders + self.shards + self.joined

    def describe(self) -> str:
        return (
            f"teacher decoders {format_bytes(self.decoders)}, shards "
            f"{format_bytes(self.shards)}, joined file {format_bytes(self.joined)}"
        )


def space_needed(
    output: Path,
    plan: ExtractionPlan,
    pending: Mapping[str, Sequence[int]],
    rank: int = 0,
    layout: JoinLayout = "copy",
    decoder_bytes: int = 0,
) -> SpaceNeeded:
    """An upper bound of what writing the `pending` images (by teacher) adds to the disk;
    rank 0 also stores the decoders not on disk yet and writes the joined file.
    `decoder_bytes`: one teacher's decoder as stored (see `samkd.extract.decoder_bytes`)."""
    itemsize = storage_itemsize(plan.dtype)
    shards = 0
    for teacher in plan.teachers:
        indices = pending.get(teacher.name, ())
        per_image = sum(tap.numel * itemsize + 4 + CHUNK_OVERHEAD for tap in teacher.taps)
        files = len({index // plan.shard_size for index in indices})
        shards += len(indices) * (per_image + 1 + SKIPPED_BYTES)
        masks = teacher.name == plan.pseudo_mask_teacher
        if masks:
            shards += sum(pseudo_mask_bytes(plan, index) for index in indices)
        shards += files * _file_bytes(2 * len(teacher.taps) + 2 + 3 * masks)
    if rank != 0:
        return SpaceNeeded(shards=shards)
    missing = [t for t in plan.teachers if not decoder_path(output, t.name).exists()]
    decoders = len(missing) * (decoder_bytes + _file_bytes(0))
    return SpaceNeeded(decoders, shards, _joined_bytes(plan, layout, decoder_bytes))


def _file_bytes(datasets: int) -> int:
    return FILE_OVERHEAD + datasets * DATASET_OVERHEAD + BLOCK


def _joined_bytes(plan: ExtractionPlan, layout: JoinLayout, decoder_bytes: int) -> int:
    """The joined output: index, attributes, per teacher its checksums, flags, decoder,
    (copied) features and pseudo-masks (copied in either layout)."""
    itemsize = storage_itemsize(plan.dtype)
    ids = sum(len(image.id.encode()) for image in plan.images)
    index = ids + plan.num_images * (160 + SKIPPED_BYTES) + 7 * DATASET_OVERHEAD
    attributes = 2 * len(plan.settings_yaml.encode()) + len(plan.to_json(created="").encode())
    total = _file_bytes(0) + index + attributes
    for teacher in plan.teachers:
        taps = len(teacher.taps)
        total += decoder_bytes + (2 * taps + 1) * DATASET_OVERHEAD
        total += plan.num_images * (4 * taps + 1)  # checksums and flags
        if layout == "copy":
            per_image = sum(tap.numel * itemsize + CHUNK_OVERHEAD for tap in teacher.taps)
            total += plan.num_images * per_image
        else:
            total += plan.num_shards * taps * DATASET_OVERHEAD // 8  # the virtual mappings
        if teacher.name == plan.pseudo_mask_teacher:
            images = range(plan.num_images)
            total += 3 * DATASET_OVERHEAD + sum(pseudo_mask_bytes(plan, i) for i in images)
    return total


def open_for_extraction(
    output: Path,
    plan: ExtractionPlan,
    *,
    rank: int = 0,
    world_size: int = 1,
    layout: JoinLayout = "copy",
    queue_size: int = 4,
    on_progress: ProgressCallback | None = None,
    check_free_space: bool = True,
    decoder_bytes: int = 0,
) -> FeatureWriter:
    """Start or resume writing `plan` to `output`.

    Refuses (FeatureStoreError, one line naming the difference) when `output` or its parts
    folder was written with a different plan, and when the disk is too small for what is
    left to write (`space_needed`; `decoder_bytes`: one teacher's decoder as stored). A
    finished `output` gives a writer with nothing to do. `on_progress(teacher, num_images)`
    is called on the writer thread after each batch is flushed.

    Rank 0 holds the output's lock (`samkd.features.lock`) until the writer is closed, so a
    second writer of the same output fails with OutputLockedError; the other ranks take
    none (their job's rank 0 holds it, see `samkd.extract`).
    """
    output = Path(output)
    held = ExitStack()
    try:
        with storage_errors(output):
            if rank == 0:
                held.enter_context(output_lock(output))
            writer = _open(output, plan, rank, world_size, layout, check_free_space, decoder_bytes)
    except BaseException:
        held.close()
        raise
    pending, message = writer
    return FeatureWriter(
        output, plan, pending, message, rank, world_size, layout, queue_size, on_progress, held
    )


def _open(
    output: Path,
    plan: ExtractionPlan,
    rank: int,
    world_size: int,
    layout: JoinLayout,
    check_free_space: bool,
    decoder_bytes: int,
) -> tuple[dict[str, list[int]], str]:
    """The images this rank has left to write, by teacher, and the writer's message."""
    if output.exists():
        _check_same_plan(output, plan, _stored_identity_of_output(output), _output_images)
        if rank == 0 and parts_dir(output).exists() and _output_layout(output) == "copy":
            shutil.rmtree(parts_dir(output))  # a run killed after the join, before the cleanup
        return {}, f"{output.name}: already complete, nothing to do"
    parts = parts_dir(output)
    parts.mkdir(parents=True, exist_ok=True)
    _write_or_check_plan(output, plan, rank)
    pending: dict[str, list[int]] = {}
    missing: dict[str, list[int]] = {}  # of every rank: they share the disk
    shards_done = 0
    mine = set(plan.shards_of_rank(rank, world_size))
    for teacher in plan.teachers:
        (parts / teacher.name).mkdir(exist_ok=True)
        pending[teacher.name], missing[teacher.name] = [], []
        for shard in range(plan.num_shards):
            if shard_path(output, teacher.name, shard).exists():
                shards_done += shard in mine
                continue
            missing[teacher.name].extend(plan.shard_range(shard))
            if shard in mine:
                pending[teacher.name].extend(plan.shard_range(shard))
    if check_free_space:
        needed = space_needed(
            output, plan, missing if rank == 0 else pending, rank, layout, decoder_bytes
        )
        ensure_free_space(output, needed.total, needed.describe())
    total = len(mine) * len(plan.teachers)
    state = f"resuming, {shards_done} of {total} shards done" if shards_done else "starting"
    message = (
        f"{output.name}: {state}; planned size {format_bytes(planned_bytes(plan))} "
        f"({plan.num_images} images, {len(plan.teachers)} teachers)"
    )
    if not any(pending.values()):
        message = f"{output.name}: all shards of rank {rank} are on disk, nothing to compute"
    return pending, message


def ensure_free_space(output: Path, needed: int, detail: str = "") -> None:
    """Refuse to start when the output's disk has fewer than `needed` bytes free."""
    folder = existing_folder(output.parent)
    free = free_bytes(folder)
    if free < needed:
        what = f" ({detail})" if detail else ""
        raise StorageError(
            f"{output.name}: needs {format_bytes(needed)} free on {folder}{what}, "
            f"only {format_bytes(free)} available"
        )


def _write_or_check_plan(output: Path, plan: ExtractionPlan, rank: int) -> None:
    """Create `plan.json` and `index.h5` in the parts folder, or check they match `plan`.

    When they match but image files were touched (same bytes, new stat), rank 0 rewrites the
    index with the new stats, so that the next run does not hash those files again, and
    deletes the hash checkpoints of the indexing.
    """
    plan_file, index_file = parts_dir(output) / "plan.json", parts_dir(output) / "index.h5"
    if not plan_file.exists():
        with atomic_path(plan_file, exclusive=True) as temporary:
            temporary.write_text(plan.to_json(created=utc_now()))
    if not index_file.exists():
        write_index_file(index_file, plan.images, plan.preprocessing)
    stored = json.loads(plan_file.read_text())
    _check_same_plan(output, plan, stored, _parts_images, delete=str(parts_dir(output)))
    if rank == 0:
        if not _stats_match(index_file, plan):
            write_index_file(index_file, plan.images, plan.preprocessing, exclusive=False)
        for checkpoint in checkpoint_paths(output):  # the index now holds their records
            checkpoint.unlink(missing_ok=True)


def _stats_match(index_file: Path, plan: ExtractionPlan) -> bool:
    """Whether the index holds the file stats of `plan` (or `plan` knows none)."""
    sizes = np.array([record.file_size for record in plan.images], dtype=np.int64)
    mtimes = np.array([record.mtime_ns for record in plan.images], dtype=np.int64)
    if (sizes < 0).all():
        return True
    with open_read_only(index_file) as handle:
        images = handle["images"]
        if "file_sizes" not in images:
            return False
        stored = images["file_sizes"][()], images["file_mtimes_ns"][()]
    return np.array_equal(stored[0], sizes) and np.array_equal(stored[1], mtimes)


def _check_same_plan(
    output: Path,
    plan: ExtractionPlan,
    stored: Mapping[str, Any],
    stored_images: Callable[[Path], Sequence[Any]],
    delete: str = "it",
) -> None:
    """Refuse a plan other than the stored one; `delete` names what to delete to start
    over (the unfinished extraction's parts folder, not the output it never wrote)."""
    difference = describe_difference(stored, plan.identity())
    if difference is not None and "image index" in difference:
        difference = first_image_difference(stored_images(output), plan.images) or difference
    if difference is not None:
        raise FeatureStoreError(
            f"{output.name}: {difference} (use another output, or delete {delete} to start over)"
        )


def _stored_identity_of_output(output: Path) -> dict[str, Any]:
    try:
        with open_read_only(output) as handle:
            return json.loads(handle.attrs["plan"])
    except (OSError, KeyError) as error:
        raise FeatureStoreError(f"{output.name}: not a readable feature file ({error})") from None


def _output_layout(output: Path) -> str:
    with open_read_only(output) as handle:
        return str(handle.attrs.get("layout", ""))


def _output_images(output: Path) -> Sequence[Any]:
    return read_index_file(output)


def _parts_images(output: Path) -> Sequence[Any]:
    return read_index_file(parts_dir(output) / "index.h5")
