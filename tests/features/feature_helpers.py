"""Small deterministic plans and features for the feature-store tests (no models)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from pycocotools import mask as mask_utils

from samkd.features import (
    ExtractionPlan,
    FeatureWriter,
    ImageRecord,
    TapSpec,
    TeacherSpec,
    open_for_extraction,
)

TAPS = (
    TapSpec("encoder.embed", (256, 16, 16)),
    TapSpec("encoder.block.3", (32, 16, 16)),
    TapSpec("encoder.attn.3", (16, 16)),
    TapSpec("decoder.iou", (3,)),
)
PREPROCESSING = {"resize": "longest_side", "pixel_mean": [123.675, 116.28, 103.53]}
# The plan of `extract_script.py`, the extraction the kill tests SIGKILL.
KILL_PLAN = {"num_images": 24, "shard_size": 4}
# A plan's pseudo-masks: those of vit_h, at most 3 per image (options as extract stores them).
PSEUDO_MASKS = {
    "teacher": "vit_h",
    "points_per_side": 4,
    "points_per_batch": 64,
    "pred_iou_thresh": 0.0,
    "stability_score_thresh": 0.0,
    "stability_score_offset": 1.0,
    "box_nms_thresh": 0.7,
    "max_masks": 3,
}


def make_images(count: int) -> tuple[ImageRecord, ...]:
    return tuple(
        ImageRecord(f"img_{i:04d}.jpg", 480 + i, 640, hashlib.sha256(f"{i}".encode()).hexdigest())
        for i in range(count)
    )


def make_teacher(name: str = "vit_h", image_size: int = 1024, taps=TAPS) -> TeacherSpec:
    return TeacherSpec(name, name, image_size, tuple(taps), "sam_vit_h.pth", "ab" * 32)


def make_plan(
    num_images: int = 10,
    teachers: Sequence[str] = ("vit_h", "vit_b"),
    shard_size: int = 4,
    image_size: int = 1024,
    **options: Any,
) -> ExtractionPlan:
    return ExtractionPlan(
        images=make_images(num_images),
        teachers=tuple(make_teacher(name, image_size) for name in teachers),
        preprocessing=PREPROCESSING,
        shard_size=shard_size,
        settings_yaml="extract:\n  dtype: float16\n",
        **options,
    )


def features_for(
    plan: ExtractionPlan, teacher: str, indices: Sequence[int]
) -> dict[str, np.ndarray]:
    """float32 features that depend only on (teacher, tap, image index)."""
    features = {}
    for tap in plan.teacher(teacher).taps:
        rows = []
        for index in indices:
            key = f"{teacher}/{tap.name}/{index}".encode()
            seed = int.from_bytes(hashlib.sha256(key).digest()[:4])
            rows.append(np.random.default_rng(seed).standard_normal(tap.shape, dtype=np.float32))
        features[tap.name] = np.stack(rows)
    return features


def pseudo_masks_for(plan: ExtractionPlan, indices: Sequence[int]) -> list[list[dict[str, Any]]]:
    """Image i's masks: i % 4 boxes (at most `max_masks`) at its size, as COCO RLE."""
    rows = []
    for index in indices:
        image = plan.images[index]
        masks = []
        for number in range(min(index % 4, plan.max_masks)):
            mask = np.zeros((image.height, image.width), dtype=np.uint8, order="F")
            mask[10 * number : 10 * number + 40 + index, 5 : 60 + 7 * number] = 1
            rle = mask_utils.encode(mask)
            masks.append(
                {
                    "size": [image.height, image.width],
                    "counts": rle["counts"].decode(),
                    "predicted_iou": 0.9 - 0.1 * number,
                    "stability_score": 0.5 + index / 100,
                }
            )
        rows.append(masks)
    return rows


def decoder_state_for(teacher: str) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(len(teacher))
    return {
        "image_encoder.patch_embed.weight": rng.standard_normal((4, 3), dtype=np.float32),
        "prompt_encoder.point_embeddings.0.weight": rng.standard_normal((1, 8), dtype=np.float32),
        "mask_decoder.iou_token.weight": rng.standard_normal((1, 8), dtype=np.float32),
    }


def write_all(
    writer: FeatureWriter, batch_size: int = 3, sleep: float = 0.0, limit: int | None = None
) -> int:
    """Write every pending image of every teacher in batches; returns images written."""
    import time

    written = 0
    for teacher in writer.plan.teacher_names:
        writer.write_decoder_state(teacher, decoder_state_for(teacher))
        todo = writer.todo(teacher)
        for start in range(0, len(todo), batch_size):
            if limit is not None and written >= limit:
                return written
            indices = todo[start : start + batch_size]
            masks = None
            if teacher == writer.plan.pseudo_mask_teacher:
                masks = pseudo_masks_for(writer.plan, indices)
            features = features_for(writer.plan, teacher, indices)
            writer.write_batch(teacher, indices, features, pseudo_masks=masks)
            written += len(indices)
            if sleep:
                time.sleep(sleep)
    return written


def extract(output: Path, plan: ExtractionPlan, **options: Any) -> Path | None:
    """A whole extraction in this process."""
    with open_for_extraction(output, plan, **options) as writer:
        write_all(writer)
        return writer.finish()


def read_datasets(path: Path) -> dict[str, tuple[str, bytes]]:
    """Every dataset of a file (virtual ones resolved): name -> (dtype, bytes)."""
    found: dict[str, tuple[str, bytes]] = {}

    def visit(name: str, item: Any) -> None:
        if isinstance(item, h5py.Dataset):
            values = item[()]
            if values.dtype.kind == "O":  # variable-length strings: compare the text
                found[name] = ("str", "\0".join(item.asstr()[()]).encode())
            else:
                found[name] = (str(item.dtype), np.ascontiguousarray(values).tobytes())

    with h5py.File(path, "r") as handle:
        handle.visititems(visit)
    return found
