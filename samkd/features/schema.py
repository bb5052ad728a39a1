"""Layout of a samkd teacher-feature file, and the plan that an extraction writes.

A feature file (`features.h5`) holds, for N images and one or more teachers:

    /                                 attrs: format = "samkd-features", schema_version = 1
                                             (2 when /images/skipped is present, 3 when
                                             pseudo-masks are, with or without it),
                                             samkd_version, created (ISO 8601, UTC),
                                             dtype, compression, shard_size,
                                             settings (the resolved settings, YAML),
                                             plan (the extraction plan, JSON),
                                             layout ("copy" or "virtual")
    /images/ids                       (N,) utf-8 strings, in dataset order
    /images/original_sizes            (N, 2) int64, (height, width) of the image file
    /images/sha256                    (N,) 64-char ascii, sha256 of the image file bytes
    /images/file_sizes                (N,) int64, bytes of the image file   } when hashed, to
    /images/file_mtimes_ns            (N,) int64, its modification time    } skip hashing again
    /images/skipped                   (N,) utf-8 strings, only when an image could not be
                                      read under data.on_error=skip: why it was skipped, or
                                      "" (its rows of every tap are zeros, and done is set)
    /images                           attrs: preprocessing (JSON)
    /teachers/<name>                  attrs: model_type, checkpoint_name, checkpoint_sha256,
                                             image_size, taps (JSON list), tap_kinds (JSON),
                                             frame ("longest_side", or "square": SAM 2's
                                             input, the whole image resized to S x S; its
                                             spatial taps are in that frame)
    /teachers/<name>/taps/<tap>       (N, *tap_shape) float16 (or float32), chunks (1, *tap_shape),
                                      compression none / gzip / lzf. Encoder maps are
                                      N x C x H x W; attention taps are coarse maps
                                      N x G^2 x G^2 (never full maps); 1-D taps are N x D.
    /teachers/<name>/crc32/<tap>      (N,) uint32, zlib.crc32 of each stored sample's bytes
    /teachers/<name>/done             (N,) bool, per-image completion flag
    /teachers/<name>/decoder/<key>    the teacher's `prompt_encoder.*` and `mask_decoder.*`
                                      weights (SAM 2: `sam_prompt_encoder.*` and
                                      `sam_mask_decoder.*`; state-dict keys, original dtype)
    /teachers/<name>/pseudo_masks     (N,) utf-8 strings, only for the teacher of
                                      extract.pseudo_masks: per image, its automatic masks as
                                      a JSON list of {"size": [H, W], "counts": COCO RLE
                                      string, "predicted_iou", "stability_score"}, highest
                                      predicted IoU first ("[]": none, or a skipped image);
                                      the generator's options are in the plan's pseudo_masks
    /teachers/<name>/pseudo_masks_crc32  (N,) uint32, zlib.crc32 of each row's utf-8 bytes
    /teachers/<name>/pseudo_mask_counts  (N,) int32, the number of masks of each row

While an extraction runs, the data lives next to the output in `<output>.parts/`:

    plan.json                         the plan (everything that decides the data), JSON
    index.h5                          the image index (/images as above)
    image-hashes-<id>.h5              while rank 0 first indexes the images: the records
                                      hashed so far (/images as above), to resume the indexing
    <teacher>/part-00000.h5           shard 0: images [0, shard_size), with /taps/<tap>,
                                      /crc32/<tap>, /done and /skipped laid out as above (and
                                      /pseudo_masks, /pseudo_masks_crc32, /pseudo_mask_counts)
    <teacher>/decoder.h5              the teacher's decoder weights

Every file in the parts folder appears under its final name only once complete (written to a
temporary name, fsynced, renamed), so the folder is always a consistent, resumable record of
the work done. `join_shards` turns it into the output file, again via a temporary name: by
copying the chunks ("copy", the parts folder is removed afterwards) or as HDF5 virtual datasets
whose sources are the shards, by relative path ("virtual", the parts folder must stay);
pseudo-masks are copied in both layouts.
While an extraction runs, `.<output>.lock` beside the output names the process writing it
(see `samkd.features.lock`).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from samkd.models.registry import is_sam2_type
from samkd.models.taps import ENCODER_HIGH_RES

SCHEMA_VERSION = 1
# A file listing skipped images is version 2, so that samkd versions without the list
# refuse it rather than read the skipped images' zeros as features; other files stay 1.
SKIPPED_SCHEMA_VERSION = 2
# A file with pseudo-masks is version 3 (whether or not it lists skipped images), and so is
# the identity of a plan that makes them: samkd versions without them refuse both.
PSEUDO_MASKS_SCHEMA_VERSION = 3
READABLE_SCHEMA_VERSIONS = (SCHEMA_VERSION, SKIPPED_SCHEMA_VERSION, PSEUDO_MASKS_SCHEMA_VERSION)
# Bytes of one image's pseudo-masks, for the space estimates: per mask, its record (keys and
# numbers) and RLE_BYTES_PER_SIDE per pixel of H + W of the image. The compressed RLE of a
# compact mask takes 2 to 4 bytes per column it spans (at most W), so this is at least twice
# that; a mask of many parts or holes can take more. Per row, a variable-length string
# reference, a crc32 and a count.
MASK_RECORD_BYTES = 128
RLE_BYTES_PER_SIDE = 8
PSEUDO_MASK_ROW_BYTES = 16 + 4 + 4
# The extract setting behind each entry of a plan's `compute` record.
COMPUTE_SETTINGS = {"precision": "precision", "attention": "fast_teacher"}
FILE_FORMAT = "samkd-features"
FLOAT16_MAX = float(np.finfo(np.float16).max)
GZIP_LEVEL = 4

StorageDtype = Literal["float16", "float32"]
Compression = Literal["none", "gzip", "lzf"]
JoinLayout = Literal["copy", "virtual"]
TapKind = Literal["spatial", "attention", "other"]
# A teacher's input frame (`samkd.models.frames`); files without one are longest_side.
LONGEST_SIDE = "longest_side"


class FeatureStoreError(RuntimeError):
    """A feature file is missing, incomplete, corrupt or does not match; the message is one line."""


# --------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class ImageRecord:
    """One image of the index: its id, original size and the sha256 of its file bytes.

    `file_size` and `mtime_ns` are the file's `stat` when it was hashed (-1: unknown): a file
    whose stat is unchanged is not hashed again. They are not part of the image's identity.
    """

    id: str
    height: int
    width: int
    sha256: str
    file_size: int = field(default=-1, compare=False)
    mtime_ns: int = field(default=-1, compare=False)


def infer_tap_kind(name: str, shape: Sequence[int]) -> TapKind:
    """`attention` for square G^2 x G^2 maps of attention taps, `spatial` for C x H x W."""
    square = len(shape) == 2 and shape[0] == shape[1] and math.isqrt(shape[0]) ** 2 == shape[0]
    if square and any(word in name for word in ("attn", "attention", "qk")):
        return "attention"
    if len(shape) >= 3:
        return "spatial"
    return "other"


@dataclass(frozen=True)
class TapSpec:
    """A stored tap: its name and per-image shape (C x H x W, G^2 x G^2, or D).

    `kind` decides how `flip` mirrors it: `spatial` flips the last axis, `attention` mirrors
    the coarse grid of both queries and keys, `other` is left alone. Inferred when not given.
    """

    name: str
    shape: tuple[int, ...]
    kind: TapKind | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(side) for side in self.shape))
        if self.kind is None:
            object.__setattr__(self, "kind", infer_tap_kind(self.name, self.shape))
        if "/" in self.name or not self.name:
            raise ValueError(f"tap name must be non-empty without '/', got {self.name!r}")

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class TeacherSpec:
    """What identifies one teacher's features: model, weights, input size and frame, taps."""

    name: str
    model_type: str
    image_size: int
    taps: tuple[TapSpec, ...]
    checkpoint_name: str | None = None
    checkpoint_sha256: str | None = None
    frame: str = LONGEST_SIDE

    def tap(self, name: str) -> TapSpec:
        for tap in self.taps:
            if tap.name == name:
                return tap
        raise KeyError(f"teacher '{self.name}' has no tap '{name}'")

    @property
    def tap_names(self) -> list[str]:
        return [tap.name for tap in self.taps]


@dataclass(frozen=True)
class ExtractionPlan:
    """Everything that decides the bytes of a feature file, plus how the work is split.

    Images are split into shards of `shard_size` consecutive images; shard `s` holds images
    `[s * shard_size, (s + 1) * shard_size)`. `compute` says how the teachers ran (e.g.
    `{"precision": "bf16", "attention": "fused"}`), so that a resumed run does not mix
    features computed two ways. `pseudo_masks`, when set, is the `teacher` whose automatic
    masks are stored and the generator's options (`samkd.settings.PseudoMaskSettings`'s
    other fields but `enabled`). `allow_overflow` / `allow_nonfinite` and `settings_yaml` are
    recorded but do not make two plans differ.
    """

    images: tuple[ImageRecord, ...]
    teachers: tuple[TeacherSpec, ...]
    preprocessing: Mapping[str, Any] = field(default_factory=dict)
    dtype: StorageDtype = "float16"
    compression: Compression = "none"
    shard_size: int = 64
    allow_overflow: bool = False
    allow_nonfinite: bool = False
    settings_yaml: str = ""
    compute: Mapping[str, str] = field(default_factory=dict)
    pseudo_masks: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "images", tuple(self.images))
        object.__setattr__(self, "teachers", tuple(self.teachers))
        if self.shard_size < 1:
            raise ValueError(f"shard_size must be at least 1, got {self.shard_size}")
        ids = [image.id for image in self.images]
        if len(set(ids)) != len(ids):
            repeated = next(image_id for image_id in ids if ids.count(image_id) > 1)
            raise ValueError(f"image ids must be unique, '{repeated}' is repeated")
        names = [teacher.name for teacher in self.teachers]
        if len(set(names)) != len(names):
            raise ValueError(f"teacher names must be unique, got {names}")
        if self.pseudo_masks is not None:
            record = json.loads(json.dumps(dict(self.pseudo_masks), sort_keys=True))
            if record.get("teacher") not in names:
                raise ValueError(
                    f"pseudo_masks teacher must be one of {names}, got {record.get('teacher')!r}"
                )
            object.__setattr__(self, "pseudo_masks", record)

    @property
    def pseudo_mask_teacher(self) -> str | None:
        """The teacher whose pseudo-masks are stored, or None."""
        return None if self.pseudo_masks is None else str(self.pseudo_masks["teacher"])

    @property
    def max_masks(self) -> int:
        """Pseudo-masks stored per image at most (0 without pseudo-masks)."""
        return 0 if self.pseudo_masks is None else int(self.pseudo_masks["max_masks"])

    @property
    def num_images(self) -> int:
        return len(self.images)

    @property
    def num_shards(self) -> int:
        return -(-self.num_images // self.shard_size)

    def shard_range(self, shard: int) -> range:
        """Image indices of `shard`."""
        start = shard * self.shard_size
        return range(start, min(start + self.shard_size, self.num_images))

    def shards_of_rank(self, rank: int, world_size: int) -> list[int]:
        """The shards that `rank` of `world_size` writes: every world_size-th, disjoint."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        return list(range(rank, self.num_shards, world_size))

    def teacher(self, name: str) -> TeacherSpec:
        for teacher in self.teachers:
            if teacher.name == name:
                return teacher
        raise KeyError(f"no teacher '{name}' in the plan (teachers: {self.teacher_names})")

    @property
    def teacher_names(self) -> list[str]:
        return [teacher.name for teacher in self.teachers]

    def images_digest(self) -> str:
        """sha256 over ids, sizes and content hashes, in order."""
        digest = hashlib.sha256()
        for image in self.images:
            digest.update(f"{image.id}\0{image.height}\0{image.width}\0{image.sha256}\n".encode())
        return digest.hexdigest()

    def identity(self) -> dict[str, Any]:
        """The JSON-able fields that decide the data (what a rerun must match)."""
        pseudo_masks = {} if self.pseudo_masks is None else {"pseudo_masks": self.pseudo_masks}
        version = SCHEMA_VERSION if self.pseudo_masks is None else PSEUDO_MASKS_SCHEMA_VERSION
        return {
            "schema_version": version,
            "num_images": self.num_images,
            "images_digest": self.images_digest(),
            "preprocessing": json.loads(json.dumps(dict(self.preprocessing), sort_keys=True)),
            "dtype": self.dtype,
            "compression": self.compression,
            "shard_size": self.shard_size,
            "teachers": [_teacher_to_json(teacher) for teacher in self.teachers],
            "compute": dict(sorted(self.compute.items())),
            **pseudo_masks,
        }

    def to_json(self, created: str) -> str:
        """The plan as stored in `plan.json` and in the output's `plan` attribute."""
        record = self.identity() | {
            "created": created,
            "allow_overflow": self.allow_overflow,
            "allow_nonfinite": self.allow_nonfinite,
            "settings": self.settings_yaml,
        }
        return json.dumps(record, indent=1)


def _teacher_to_json(teacher: TeacherSpec) -> dict[str, Any]:
    return {
        "name": teacher.name,
        "model_type": teacher.model_type,
        "image_size": teacher.image_size,
        "checkpoint_name": teacher.checkpoint_name,
        "checkpoint_sha256": teacher.checkpoint_sha256,
        "frame": teacher.frame,
        "taps": [{"name": t.name, "shape": list(t.shape), "kind": t.kind} for t in teacher.taps],
    }


def teacher_from_json(record: Mapping[str, Any]) -> TeacherSpec:
    taps = tuple(TapSpec(t["name"], tuple(t["shape"]), t["kind"]) for t in record["taps"])
    return TeacherSpec(
        name=record["name"],
        model_type=record["model_type"],
        image_size=int(record["image_size"]),
        taps=taps,
        checkpoint_name=record.get("checkpoint_name"),
        checkpoint_sha256=record.get("checkpoint_sha256"),
        frame=record.get("frame", LONGEST_SIDE),
    )


# --------------------------------------------------------------------------- differences


def describe_difference(stored: Mapping[str, Any], planned: Mapping[str, Any]) -> str | None:
    """The first way two plan identities differ, as a phrase; None when they match.

    e.g. "teacher 'vit_h' was extracted with image_size 1024, now 512".
    """
    difference = _pseudo_mask_difference(stored.get("pseudo_masks"), planned.get("pseudo_masks"))
    if difference is not None:
        return difference
    if stored.get("schema_version") != planned.get("schema_version"):
        return (
            f"schema_version was {stored.get('schema_version')}, "
            f"now {planned.get('schema_version')}"
        )
    stored_teachers = {t["name"]: t for t in stored["teachers"]}
    planned_teachers = {t["name"]: t for t in planned["teachers"]}
    if list(stored_teachers) != list(planned_teachers):
        return f"was extracted for teachers {list(stored_teachers)}, now {list(planned_teachers)}"
    for name, old in stored_teachers.items():
        new = planned_teachers[name]
        for key in ("model_type", "image_size", "checkpoint_name", "checkpoint_sha256"):
            if old[key] != new[key]:
                return f"teacher '{name}' was extracted with {key} {old[key]}, now {new[key]}"
        was, now = old.get("frame", LONGEST_SIDE), new.get("frame", LONGEST_SIDE)
        if was != now:
            return f"teacher '{name}' was extracted in frame {was}, now {now}"
        old_taps = {tap["name"]: tap for tap in old["taps"]}
        new_taps = {tap["name"]: tap for tap in new["taps"]}
        if list(old_taps) != list(new_taps):
            return (
                f"teacher '{name}' was extracted with taps {list(old_taps)}, now {list(new_taps)}"
            )
        for tap_name, tap in old_taps.items():
            now = new_taps[tap_name]
            if tap != now:
                return (
                    f"teacher '{name}' tap '{tap_name}' was extracted with shape "
                    f"{tuple(tap['shape'])} ({tap['kind']}), "
                    f"now {tuple(now['shape'])} ({now['kind']})"
                )
    if stored["images_digest"] != planned["images_digest"]:
        return "was extracted with a different image index (ids, sizes or file hashes)"
    for key in ("dtype", "compression", "shard_size"):
        if stored[key] != planned[key]:
            return f"was extracted with {key} {stored[key]}, now {planned[key]}"
    old_pre, new_pre = stored["preprocessing"], planned["preprocessing"]
    for key in sorted(set(old_pre) | set(new_pre)):
        if old_pre.get(key) != new_pre.get(key):
            was, now = old_pre.get(key), new_pre.get(key)
            return f"was extracted with preprocessing {key}={was}, now {now}"
    return _compute_difference(stored.get("compute"), planned.get("compute", {}))


def _pseudo_mask_difference(
    stored: Mapping[str, Any] | None, planned: Mapping[str, Any] | None
) -> str | None:
    """How the pseudo-masks of two plans differ (the teacher, then each option)."""
    if stored is None and planned is None:
        return None
    if stored is None or planned is None:
        was, now = ("without", "with") if stored is None else ("with", "without")
        return f"was extracted {was} pseudo-masks, now {now} (extract.pseudo_masks.enabled)"
    for key in ["teacher", *sorted((set(stored) | set(planned)) - {"teacher"})]:
        if stored.get(key) != planned.get(key):
            return (
                f"was extracted with extract.pseudo_masks.{key} {stored.get(key)}, "
                f"now {planned.get(key)}"
            )
    return None


def _compute_difference(stored: Mapping[str, str] | None, planned: Mapping[str, str]) -> str | None:
    """Files written before `compute` was recorded resume under any compute."""
    if stored is None:
        return None
    for key in sorted(set(stored) | set(planned)):
        if stored.get(key) != planned.get(key):
            return (
                f"was extracted with {key} {stored.get(key)}, now {planned.get(key)}; "
                f"set extract.{COMPUTE_SETTINGS.get(key, key)} to match"
            )
    return None


def first_image_difference(
    stored: Sequence[ImageRecord], planned: Sequence[ImageRecord]
) -> str | None:
    """Which image differs first, e.g. "image 3 was 'a.jpg', now 'b.jpg'"."""
    for index, (old, new) in enumerate(zip(stored, planned, strict=False)):
        if old != new:
            if old.id != new.id:
                return f"image {index} was '{old.id}', now '{new.id}'"
            if old.sha256 != new.sha256:
                was, now = old.sha256[:12], new.sha256[:12]
                return f"image '{old.id}' has changed (sha256 {was}..., now {now}...)"
            return f"image '{old.id}' was {old.height}x{old.width}, now {new.height}x{new.width}"
    if len(stored) != len(planned):
        return f"was extracted for {len(stored)} images, now {len(planned)}"
    return None


# --------------------------------------------------------------------------- sizes and paths


def storage_itemsize(dtype: StorageDtype) -> int:
    return np.dtype(dtype).itemsize


def planned_bytes(plan: ExtractionPlan) -> int:
    """Bytes of the tap data (uncompressed), the pseudo-masks (as `pseudo_mask_bytes`
    estimates them) and the index: an upper bound for the file size."""
    itemsize = storage_itemsize(plan.dtype)
    per_image = sum(
        tap.numel * itemsize + 4 + 1 for teacher in plan.teachers for tap in teacher.taps
    )
    index = plan.num_images * (64 + 16 + 16 + 64)
    masks = sum(pseudo_mask_bytes(plan, image) for image in range(plan.num_images))
    return plan.num_images * per_image + index + masks


def pseudo_mask_bytes(plan: ExtractionPlan, image: int) -> int:
    """A generous estimate of the bytes of one image's stored pseudo-masks (0 without them):
    `max_masks` masks of `MASK_RECORD_BYTES + RLE_BYTES_PER_SIDE * (H + W)` bytes each."""
    if plan.pseudo_masks is None:
        return 0
    record = plan.images[image]
    per_mask = MASK_RECORD_BYTES + RLE_BYTES_PER_SIDE * (record.height + record.width)
    return PSEUDO_MASK_ROW_BYTES + plan.max_masks * per_mask


def parts_dir(output: Path) -> Path:
    """Folder holding the shards of `output` while it is extracted (`features.h5.parts`)."""
    return output.with_name(output.name + ".parts")


def shard_path(output: Path, teacher: str, shard: int) -> Path:
    return parts_dir(output) / teacher / f"part-{shard:05d}.h5"


def decoder_path(output: Path, teacher: str) -> Path:
    return parts_dir(output) / teacher / "decoder.h5"


def file_sha256(path: Path, block_size: int = 1 << 20) -> str:
    """sha256 of a file's bytes, hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(block_size), b""):
            digest.update(block)
    return digest.hexdigest()


def teacher_taps(settings: Any, teacher: Any) -> list[str]:
    """The taps stored for one teacher: its own `taps`, else `extract.taps`; with
    `extract.high_res`, a SAM 2 teacher's high-resolution maps too."""
    taps = list(teacher.taps or settings.extract.taps)
    if settings.extract.high_res and is_sam2_type(teacher.model_type):
        taps += [tap for tap in ENCODER_HIGH_RES if tap not in taps]
    return taps


def pseudo_mask_plan(settings: Any) -> dict[str, Any] | None:
    """The plan's `pseudo_masks` record of `samkd.settings.Settings` (None when disabled):
    the teacher (`extract.pseudo_masks.teacher`, default the first) and the options."""
    options = settings.extract.pseudo_masks
    if not options.enabled:
        return None
    record = options.model_dump(mode="json", exclude={"enabled", "teacher"})
    teacher = options.teacher or (settings.teachers[0].name if settings.teachers else None)
    return {"teacher": teacher, **record}


def plan_from_settings(
    settings: Any,
    images: Sequence[ImageRecord],
    tap_shapes: Mapping[str, Mapping[str, Sequence[int]]],
    preprocessing: Mapping[str, Any],
    image_size: int | None = None,
    compute: Mapping[str, str] | None = None,
    frames: Mapping[str, str] | None = None,
) -> ExtractionPlan:
    """The plan of `samkd extract`: teachers, taps and storage options from `samkd.settings`.

    `settings` is a `samkd.settings.Settings` (typed loosely to keep this module free of it).
    `tap_shapes[teacher][tap]` is the per-image shape each teacher produces for each of its
    taps (`teacher_taps`) (attention taps: the coarse G^2 x G^2 map); `preprocessing` is
    whatever decides the teacher's input pixels (resize, pad, normalisation); `image_size`
    defaults to `settings.data.image_size`; `compute` is how the teachers run; `frames`,
    each teacher's input frame (default `longest_side`). The pseudo-masks are those of
    `extract.pseudo_masks` (`pseudo_mask_plan`).
    """
    extract = settings.extract
    teachers = []
    for teacher in settings.teachers:
        shapes = tap_shapes[teacher.name]
        checkpoint = teacher.checkpoint
        teachers.append(
            TeacherSpec(
                name=teacher.name,
                model_type=teacher.model_type,
                image_size=image_size or settings.data.image_size,
                taps=tuple(
                    TapSpec(tap, tuple(shapes[tap])) for tap in teacher_taps(settings, teacher)
                ),
                checkpoint_name=checkpoint.name if checkpoint else None,
                checkpoint_sha256=file_sha256(checkpoint) if checkpoint else None,
                frame=(frames or {}).get(teacher.name, LONGEST_SIDE),
            )
        )
    return ExtractionPlan(
        images=tuple(images),
        teachers=tuple(teachers),
        preprocessing=dict(preprocessing),
        dtype=extract.dtype,
        compression=extract.compression,
        shard_size=extract.shard_size,
        allow_overflow=extract.allow_overflow,
        allow_nonfinite=extract.allow_nonfinite,
        settings_yaml=settings.to_yaml(),
        compute=dict(compute or {}),
        pseudo_masks=pseudo_mask_plan(settings),
    )
