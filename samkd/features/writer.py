"""Writing teacher features: resumable, crash-safe shards filled by a background thread.

    writer = open_for_extraction(Path("features.h5"), plan)
    print(writer.message)                        # planned size, resuming, or nothing to do
    writer.write_decoder_state("vit_h", sam.state_dict())
    for indices in batches_of(writer.todo("vit_h")):
        writer.write_batch("vit_h", indices, {"encoder.embed": embed})   # B x 256 x 64 x 64
    writer.finish()                              # joins the shards into features.h5

Each shard (`shard_size` consecutive images of one teacher) is written to a temporary file
and renamed to `<output>.parts/<teacher>/part-XXXXX.h5` once all its images are on disk, so a
process killed at any moment (SIGKILL included, during a flush included) leaves only complete
shards under their final names; the rerun deletes the stale temporary files and recomputes
the unfinished shards, which ends bitwise identical to an uninterrupted run when the teacher
is deterministic. Under torchrun each rank writes the shards `rank, rank + world_size, ...`
and leaves; rank 0, out of the process group (so that no rank waits in a collective, whose
timeout a long wait or copy would hit), waits for every shard on disk and calls `join_shards`.
A join killed midway leaves only a temporary file, which the rerun deletes before joining.
"""

from __future__ import annotations

import json
import queue
import shutil
import threading
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from samkd.features.images import checkpoint_paths
from samkd.features.join import join_shards
from samkd.features.layout import (
    create_tap_dataset,
    read_index_file,
    utc_now,
    write_index_file,
    write_state_dict_file,
)
from samkd.features.schema import (
    FLOAT16_MAX,
    ExtractionPlan,
    FeatureStoreError,
    JoinLayout,
    TeacherSpec,
    decoder_path,
    describe_difference,
    first_image_difference,
    format_bytes,
    parts_dir,
    planned_bytes,
    shard_path,
)
from samkd.files import atomic_path, publish, remove_temporaries, temporary_path
from samkd.models.registry import DECODER_PREFIXES

ArrayLike = np.ndarray | torch.Tensor
ProgressCallback = Callable[[str, int], None]


@dataclass(frozen=True)
class FeatureBatch:
    """Features of one teacher for a batch: `features[tap]` is `B x *tap_shape`."""

    teacher: str
    indices: Sequence[int]
    features: Mapping[str, ArrayLike]


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
    """The `prompt_encoder.*` and `mask_decoder.*` entries of a SAM state dict, as numpy."""
    state = {
        key: to_numpy(value).copy()
        for key, value in state_dict.items()
        if key.startswith(DECODER_PREFIXES)
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
        self.file = h5py.File(self.path, "w")
        self.file.attrs["teacher"] = teacher.name
        self.file.attrs["shard"] = shard
        self.file.attrs["start"] = self.images.start
        self.file.attrs["stop"] = self.images.stop
        taps, checksums = self.file.create_group("taps"), self.file.create_group("crc32")
        for tap in teacher.taps:
            create_tap_dataset(taps, tap, len(self.images), plan.dtype, plan.compression)
            checksums.create_dataset(tap.name, shape=(len(self.images),), dtype=np.uint32)
        self.file.create_dataset("done", shape=(len(self.images),), dtype=bool)

    def write(self, local: int, tap: str, sample: np.ndarray) -> None:
        self.file["taps"][tap][local] = sample
        self.file["crc32"][tap][local] = zlib.crc32(np.ascontiguousarray(sample).data)

    def mark_done(self, local_indices: Sequence[int]) -> None:
        """Set the completion flags, after the data of these images was flushed."""
        self.done[list(local_indices)] = True
        self.file["done"][:] = self.done
        self.file.flush()

    @property
    def complete(self) -> bool:
        return bool(self.done.all())

    def publish(self) -> None:
        self.file.close()
        publish(self.path, self.final_path)

    def discard(self) -> None:
        self.file.close()
        self.path.unlink(missing_ok=True)


class _ShardSink:
    """Writes batches into shards; runs on the writer thread only."""

    def __init__(self, output: Path, plan: ExtractionPlan, on_progress: ProgressCallback | None):
        self.output, self.plan, self.on_progress = output, plan, on_progress
        self.open: dict[tuple[str, int], _OpenShard] = {}

    def write(self, teacher: str, indices: Sequence[int], features: Mapping[str, np.ndarray]):
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
    ):
        self.output, self.plan, self.message = output, plan, message
        self.rank, self.world_size, self.layout = rank, world_size, layout
        self._pending = {teacher: dict.fromkeys(indices) for teacher, indices in pending.items()}
        self._queue: queue.Queue[tuple[str, Sequence[int], dict[str, np.ndarray]] | None]
        self._queue = queue.Queue(maxsize=queue_size)
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
            write_state_dict_file(path, decoder_state(state_dict))

    def write_batch(
        self, teacher: str, indices: Sequence[int], features: Mapping[str, ArrayLike]
    ) -> None:
        """Queue `features[tap]` (`len(indices) x *tap_shape`) for the images `indices`."""
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
        pending = self._pending[teacher]
        for index in indices:
            if index not in pending:
                raise FeatureStoreError(
                    f"teacher '{teacher}': image {index} is not pending on rank {self.rank} "
                    "(already written, or another rank's)"
                )
            del pending[index]
        self._put((teacher, indices, arrays))

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
        return join_shards(self.output, layout=self.layout) if join else None

    def close(self) -> None:
        """Stop the writer thread and drop unfinished shards (complete ones stay)."""
        self._stop()
        self._sink.discard()

    def __enter__(self) -> FeatureWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _put(self, item: tuple[str, Sequence[int], dict[str, np.ndarray]] | None) -> None:
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
            writer.write_batch(batch.teacher, batch.indices, batch.features)
        return writer.finish()


# --------------------------------------------------------------------------- opening


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
) -> FeatureWriter:
    """Start or resume writing `plan` to `output`.

    Refuses (FeatureStoreError, one line naming the difference) when `output` or its parts
    folder was written with a different plan, and when the disk is too small. A finished
    `output` gives a writer with nothing to do. `on_progress(teacher, num_images)` is called
    on the writer thread after each batch is flushed.
    """
    output = Path(output)
    if output.exists():
        _check_same_plan(output, plan, _stored_identity_of_output(output), _output_images)
        if rank == 0 and parts_dir(output).exists() and _output_layout(output) == "copy":
            shutil.rmtree(parts_dir(output))  # a run killed after the join, before the cleanup
        return FeatureWriter(
            output, plan, {}, f"{output.name}: already complete, nothing to do", rank, world_size
        )
    parts = parts_dir(output)
    parts.mkdir(parents=True, exist_ok=True)
    _write_or_check_plan(output, plan, rank)
    pending: dict[str, list[int]] = {}
    shards_done = 0
    for teacher in plan.teachers:
        (parts / teacher.name).mkdir(exist_ok=True)
        pending[teacher.name] = []
        for shard in plan.shards_of_rank(rank, world_size):
            final = shard_path(output, teacher.name, shard)
            remove_temporaries(final)
            if final.exists():
                shards_done += 1
            else:
                pending[teacher.name].extend(plan.shard_range(shard))
    needed = _bytes_needed(plan, pending, rank, layout)
    if check_free_space:
        ensure_free_space(output, needed)
    total = len(plan.shards_of_rank(rank, world_size)) * len(plan.teachers)
    state = f"resuming, {shards_done} of {total} shards done" if shards_done else "starting"
    message = (
        f"{output.name}: {state}; planned size {format_bytes(planned_bytes(plan))} "
        f"({plan.num_images} images, {len(plan.teachers)} teachers)"
    )
    if not any(pending.values()):
        message = f"{output.name}: all shards of rank {rank} are on disk, nothing to compute"
    return FeatureWriter(
        output, plan, pending, message, rank, world_size, layout, queue_size, on_progress
    )


def _bytes_needed(
    plan: ExtractionPlan, pending: Mapping[str, Sequence[int]], rank: int, layout: JoinLayout
) -> int:
    left = sum(len(indices) for indices in pending.values())
    per_image_teacher = planned_bytes(plan) / max(plan.num_images * len(plan.teachers), 1)
    needed = int(left * per_image_teacher)
    if rank == 0 and layout == "copy":
        needed += planned_bytes(plan)
    return needed


def ensure_free_space(output: Path, needed: int) -> None:
    """Refuse to start when the output's disk has fewer than `needed` bytes free."""
    folder = output.resolve().parent
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise FeatureStoreError(
            f"{output.name}: needs {format_bytes(needed)} free on {folder}, "
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
    _check_same_plan(output, plan, stored, _parts_images)
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
    with h5py.File(index_file, "r") as handle:
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
) -> None:
    difference = describe_difference(stored, plan.identity())
    if difference is not None and "image index" in difference:
        difference = first_image_difference(stored_images(output), plan.images) or difference
    if difference is not None:
        raise FeatureStoreError(
            f"{output.name}: {difference} (use another output, or delete it to start over)"
        )


def _stored_identity_of_output(output: Path) -> dict[str, Any]:
    try:
        with h5py.File(output, "r") as handle:
            return json.loads(handle.attrs["plan"])
    except (OSError, KeyError) as error:
        raise FeatureStoreError(f"{output.name}: not a readable feature file ({error})") from None


def _output_layout(output: Path) -> str:
    with h5py.File(output, "r") as handle:
        return str(handle.attrs.get("layout", ""))


def _output_images(output: Path) -> Sequence[Any]:
    return read_index_file(output)


def _parts_images(output: Path) -> Sequence[Any]:
    return read_index_file(parts_dir(output) / "index.h5")
