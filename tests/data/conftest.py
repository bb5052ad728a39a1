"""Small generated datasets in every layout, written to ``tmp_path``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as coco_mask

IMAGE_SIZES = {"a": (40, 60), "b": (50, 30), "c": (32, 32)}
"""``(H, W)`` of the generated images, by image id."""


def write_image(path: Path, height: int, width: int, seed: int = 0) -> np.ndarray:
    """Write a random RGB image and return its pixels (``H x W x 3`` uint8)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return pixels


def object_masks(height: int, width: int) -> list[np.ndarray]:
    """Three distinct non-empty masks: a rectangle, a disc, a thin bar."""
    rows, columns = np.mgrid[:height, :width]
    rectangle = (rows >= 2) & (rows < height // 2) & (columns >= 3) & (columns < width // 2)
    radius = min(height, width) / 5
    disc = (rows - height * 0.65) ** 2 + (columns - width * 0.6) ** 2 < radius**2
    bar = (rows == height - 3) & (columns >= 1) & (columns < width - 1)
    return [rectangle, disc, bar]


def write_mask_png(path: Path, mask: np.ndarray, foreground: int = 255) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask.astype(np.uint8) * foreground).save(path)


def compressed_rle(mask: np.ndarray) -> dict[str, Any]:
    rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def uncompressed_rle(mask: np.ndarray) -> dict[str, Any]:
    flat = mask.T.reshape(-1).astype(np.int8)
    changes = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    runs = np.diff(np.concatenate([[0], changes]))
    return {"size": list(mask.shape), "counts": [int(v) for v in runs]}


def rectangle_polygon(mask: np.ndarray) -> list[list[float]]:
    """Polygon tracing the outer corners of a rectangular mask."""
    rows, columns = np.nonzero(mask)
    x0, y0 = float(columns.min()), float(rows.min())
    x1, y1 = float(columns.max() + 1), float(rows.max() + 1)
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def make_folder_dataset(root: Path) -> dict[str, list[np.ndarray]]:
    """``a`` with three 0/255 masks, ``b`` with one 0/1 mask, ``c`` without masks."""
    masks: dict[str, list[np.ndarray]] = {}
    for seed, (image_id, (height, width)) in enumerate(IMAGE_SIZES.items()):
        write_image(root / "image" / f"{image_id}.png", height, width, seed)
        masks[image_id] = []
    masks["a"] = object_masks(*IMAGE_SIZES["a"])
    for k, mask in enumerate(masks["a"]):
        write_mask_png(root / "mask" / "a" / f"obj_{k}.png", mask)
    masks["b"] = object_masks(*IMAGE_SIZES["b"])[1:2]
    write_mask_png(root / "mask" / "b" / "obj_0.png", masks["b"][0], foreground=1)
    return masks


def coco_annotations(masks_a: list[np.ndarray], mask_b: np.ndarray) -> list[dict[str, Any]]:
    rectangle, disc, bar = masks_a
    return [
        {"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0,
         "segmentation": rectangle_polygon(rectangle)},
        {"id": 2, "image_id": 1, "category_id": 1, "iscrowd": 1,
         "segmentation": compressed_rle(disc)},
        {"id": 3, "image_id": 1, "category_id": 2, "iscrowd": 0,
         "segmentation": uncompressed_rle(bar)},
        {"id": 4, "image_id": 2, "category_id": 1, "iscrowd": 0,
         "segmentation": compressed_rle(mask_b)},
    ]  # fmt: skip


def make_coco_dataset(root: Path) -> dict[str, list[np.ndarray]]:
    """COCO JSON with a polygon, a compressed and an uncompressed RLE; ``c`` has no objects."""
    masks = {"a": object_masks(*IMAGE_SIZES["a"]), "b": object_masks(*IMAGE_SIZES["b"])[1:2]}
    masks["c"] = []
    images = []
    for coco_id, (image_id, (height, width)) in enumerate(IMAGE_SIZES.items(), start=1):
        write_image(root / f"{image_id}.jpg", height, width, coco_id)
        images.append(
            {"id": coco_id, "file_name": f"{image_id}.jpg", "height": height, "width": width}
        )
    data = {
        "images": images,
        "annotations": coco_annotations(masks["a"], masks["b"][0]),
        "categories": [{"id": 1, "name": "thing"}, {"id": 2, "name": "stuff"}],
    }
    (root / "_annotations.coco.json").write_text(json.dumps(data))
    return masks


def sa1b_annotation(mask: np.ndarray) -> dict[str, Any]:
    rows, columns = np.nonzero(mask)
    return {
        "segmentation": compressed_rle(mask),
        "bbox": [int(columns.min()), int(rows.min()), int(np.ptp(columns)), int(np.ptp(rows))],
        "area": int(mask.sum()),
        "point_coords": [[float(columns[0]), float(rows[0])]],
    }


def make_sa1b_dataset(root: Path) -> dict[str, list[np.ndarray]]:
    """``sa_1`` with three masks, ``sa_2`` with one, ``sa_3`` without a JSON."""
    masks: dict[str, list[np.ndarray]] = {}
    for seed, (height, width) in enumerate(IMAGE_SIZES.values()):
        stem = f"sa_{seed + 1}"
        write_image(root / f"{stem}.jpg", height, width, seed)
        masks[stem] = object_masks(height, width)[: [3, 1, 0][seed]]
        if not masks[stem]:
            continue
        data = {
            "image": {"image_id": seed + 1, "width": width, "height": height,
                      "file_name": f"{stem}.jpg"},
            "annotations": [sa1b_annotation(m) for m in masks[stem]],
        }  # fmt: skip
        (root / f"{stem}.json").write_text(json.dumps(data))
    return masks


def make_dsb_dataset(root: Path) -> dict[str, list[np.ndarray]]:
    """Data Science Bowl folders: ``a`` with three masks, ``b`` with one, ``c`` without a
    ``masks/`` folder, and a CSV beside them as in the download."""
    masks: dict[str, list[np.ndarray]] = {}
    for seed, (image_id, (height, width)) in enumerate(IMAGE_SIZES.items()):
        write_image(root / image_id / "images" / f"{image_id}.png", height, width, seed)
        masks[image_id] = object_masks(height, width)[: [3, 1, 0][seed]]
        for k, mask in enumerate(masks[image_id]):
            write_mask_png(root / image_id / "masks" / f"{k:04x}.png", mask)
    (root / "stage1_train_labels.csv").write_text("ImageId,EncodedPixels\n")
    return masks


LABEL_IDS = {"a": (3, 7, 300), "b": (1,)}
"""Object ids of the generated label images, in object order: 300 needs a 16-bit image."""


def label_image(image_id: str) -> np.ndarray:
    """``H x W`` uint16 label image of ``image_id``: the objects of the folder dataset
    (``a``: three, ``b``: the disc), painted in order with ``LABEL_IDS``."""
    height, width = IMAGE_SIZES[image_id]
    masks = object_masks(height, width)
    objects = masks if image_id == "a" else masks[1:2]
    labels = np.zeros((height, width), np.uint16)
    for label_id, mask in zip(LABEL_IDS[image_id], objects, strict=True):
        labels[mask] = label_id
    return labels


def label_masks(image_id: str) -> list[np.ndarray]:
    """The object masks that ``label_image(image_id)`` holds, in id order."""
    labels = label_image(image_id)
    return [labels == label_id for label_id in LABEL_IDS[image_id]]


def make_labels_dataset(root: Path) -> dict[str, list[np.ndarray]]:
    """``images/`` and ``labels/``: ``a`` with a 16-bit label image of three objects, ``b``
    with an 8-bit one of one object, ``c`` without a label image."""
    for seed, (image_id, (height, width)) in enumerate(IMAGE_SIZES.items()):
        write_image(root / "images" / f"{image_id}.png", height, width, seed)
    (root / "labels").mkdir()
    Image.fromarray(label_image("a")).save(root / "labels" / "a.png")
    Image.fromarray(label_image("b").astype(np.uint8)).save(root / "labels" / "b.png")
    return {"a": label_masks("a"), "b": label_masks("b"), "c": []}


def make_cellpose_dataset(root: Path) -> dict[str, list[np.ndarray]]:
    """One folder, cellpose naming: ``a_img.png`` beside ``a_masks.png``, ``b.png`` beside a
    16-bit TIFF ``b_masks.tif``, ``c.png`` without a label image."""
    for seed, (image_id, (height, width)) in enumerate(IMAGE_SIZES.items()):
        name = "a_img.png" if image_id == "a" else f"{image_id}.png"
        write_image(root / name, height, width, seed)
    Image.fromarray(label_image("a")).save(root / "a_masks.png")
    Image.fromarray(label_image("b")).save(root / "b_masks.tif")
    return {"a": label_masks("a"), "b": label_masks("b"), "c": []}


@pytest.fixture
def folder_root(tmp_path: Path) -> Path:
    make_folder_dataset(tmp_path)
    return tmp_path


@pytest.fixture
def coco_root(tmp_path: Path) -> Path:
    make_coco_dataset(tmp_path)
    return tmp_path


@pytest.fixture
def sa1b_root(tmp_path: Path) -> Path:
    make_sa1b_dataset(tmp_path)
    return tmp_path
