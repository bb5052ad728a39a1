"""Decoding object masks: binary PNGs, COCO polygons and COCO/SA-1B run-length encodings.

Every decoder returns an ``H x W`` bool array and raises ``DataError`` (one line naming the
file) when the mask cannot be used: unreadable, wrong size, empty, or malformed.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as coco_mask

from samkd.data.errors import DataError
from samkd.data.images import IMAGE_DECODE_ERRORS


def load_png_mask(path: Path, image_size: tuple[int, int]) -> np.ndarray:
    """Read a binary mask image (any non-zero pixel is foreground) of size ``(H, W)``.

    Colour masks count a pixel as foreground when any colour channel is non-zero; an alpha
    channel is ignored.

    Raises:
        DataError: the file is unreadable, its size differs from the image, or it is empty.
    """
    try:
        with Image.open(path) as image:
            image.load()
            pixels = np.asarray(image)
    except FileNotFoundError as error:
        raise DataError(path, "mask file not found") from error
    except IMAGE_DECODE_ERRORS as error:
        raise DataError(path, f"cannot decode mask image ({error})") from error
    if pixels.ndim == 3:
        pixels = pixels[:, :, :3].max(axis=2)
    mask = pixels > 0
    check_mask(mask, image_size, path, "mask")
    return mask


def check_mask(mask: np.ndarray, image_size: tuple[int, int], path: Path, what: str) -> None:
    """Raise ``DataError`` unless ``mask`` is ``image_size`` ``(H, W)`` and not empty."""
    if mask.shape != tuple(image_size):
        raise DataError(
            path,
            f"{what} is {_format_size(mask.shape)} but its image is {_format_size(image_size)}",
        )
    if not mask.any():
        raise DataError(path, f"{what} is empty")


def _format_size(size: tuple[int, ...]) -> str:
    height, width = size[:2]
    return f"{width}x{height} (WxH)"


def segmentation_problem(segmentation: Any) -> str | None:
    """Describe what is wrong with a COCO ``segmentation`` field, or return ``None``.

    Checks structure only (cheap enough to run over a whole annotation file): polygons
    must be lists of at least three finite ``x, y`` pairs; RLEs need an integer ``size``
    and ``counts`` that are a string or a list of non-negative integers covering the image.
    """
    if isinstance(segmentation, dict):
        return _rle_problem(segmentation)
    if isinstance(segmentation, list):
        return _polygons_problem(segmentation)
    return f"segmentation must be a polygon list or an RLE dict, got {type(segmentation).__name__}"


def _polygons_problem(polygons: list[Any]) -> str | None:
    if not polygons:
        return "polygon list is empty"
    for polygon in polygons:
        if not isinstance(polygon, list) or not all(_is_number(v) for v in polygon):
            return "polygon must be a flat list of numbers"
        if len(polygon) < 6 or len(polygon) % 2:
            return f"polygon needs an even number (>= 6) of coordinates, got {len(polygon)}"
        if not all(math.isfinite(v) for v in polygon):
            return "polygon has a non-finite coordinate"
    return None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _rle_problem(rle: dict[str, Any]) -> str | None:
    size = rle.get("size")
    counts = rle.get("counts")
    if (
        not isinstance(size, list)
        or len(size) != 2
        or not all(isinstance(v, int) and v > 0 for v in size)
    ):
        return f"RLE size must be [height, width] of positive integers, got {size!r}"
    if isinstance(counts, str):
        return None
    if not isinstance(counts, list) or not all(isinstance(v, int) and v >= 0 for v in counts):
        return "RLE counts must be a string or a list of non-negative integers"
    if sum(counts) != size[0] * size[1]:
        return f"RLE counts sum to {sum(counts)}, expected height*width = {size[0] * size[1]}"
    return None


def decode_rle_counts(counts: str) -> list[int]:
    """Decode COCO's compressed RLE string into run lengths.

    pycocotools decodes a malformed string into garbage (it may read past the buffer), so
    the string is decoded and checked here instead.

    Raises:
        ValueError: a character is out of range, the string ends inside a number, or a run
            length is negative.
    """
    runs: list[int] = []
    value = shift = 0
    for position, character in enumerate(counts):
        code = ord(character) - 48
        if not 0 <= code < 64:
            raise ValueError(f"invalid character {character!r} at position {position}")
        value |= (code & 0x1F) << (5 * shift)
        shift += 1
        if code & 0x20:
            continue
        if code & 0x10:
            value |= -1 << (5 * shift)
        if len(runs) > 2:
            value += runs[-2]
        if value < 0:
            raise ValueError(f"negative run length at position {position}")
        runs.append(value)
        value = shift = 0
    if shift:
        raise ValueError("string ends inside a run length")
    return runs


def rle_to_mask(runs: list[int], height: int, width: int) -> np.ndarray:
    """Expand column-major run lengths (background first) into an ``H x W`` bool mask."""
    lengths = np.asarray(runs, dtype=np.int64)
    ends = np.cumsum(lengths)
    starts, lengths = (ends - lengths)[1::2], lengths[1::2]
    mask = np.zeros((height, width), dtype=bool)
    area = int(lengths.sum())
    if area * 4 > height * width:
        # Dense masks: expanding then transposing beats scattering every pixel.
        flat = np.repeat(np.arange(len(runs)) % 2 == 1, runs)
        return np.ascontiguousarray(flat.reshape(width, height).T)
    # Column-major indices of all foreground pixels: each run's start plus 0..length-1.
    first_of_run = np.repeat(starts - np.cumsum(lengths) + lengths, lengths)
    indices = first_of_run + np.arange(area)
    mask[indices % height, indices // height] = True
    return mask


def decode_segmentation(
    segmentation: Any, image_size: tuple[int, int], source: Path, label: str
) -> np.ndarray:
    """Decode a COCO polygon list or RLE dict into an ``H x W`` bool mask.

    Polygons are rasterised at ``image_size`` with pycocotools; an RLE must already be of
    that size. ``source`` (the annotation file) and ``label`` (which annotation) name the
    mask in errors.

    Raises:
        DataError: malformed segmentation, size mismatch, or an empty mask.
    """
    problem = segmentation_problem(segmentation)
    if problem is not None:
        raise DataError(source, f"{label}: {problem}")
    height, width = image_size
    if isinstance(segmentation, list):
        merged = coco_mask.merge(coco_mask.frPyObjects(segmentation, height, width))
        mask = rle_to_mask(decode_rle_counts(merged["counts"].decode("ascii")), height, width)
    else:
        mask = _decode_rle(segmentation, source, label)
    check_mask(mask, image_size, source, f"{label}: mask")
    return mask


def _decode_rle(rle: dict[str, Any], source: Path, label: str) -> np.ndarray:
    height, width = rle["size"]
    counts = rle["counts"]
    if isinstance(counts, str):
        try:
            counts = decode_rle_counts(counts)
        except ValueError as error:
            raise DataError(source, f"{label}: bad compressed RLE ({error})") from error
        if sum(counts) != height * width:
            raise DataError(
                source,
                f"{label}: bad compressed RLE (runs sum to {sum(counts)}, "
                f"expected height*width = {height * width})",
            )
    return rle_to_mask(counts, height, width)


def mask_box(mask: np.ndarray) -> np.ndarray:
    """Tight XYXY box (float64) of an ``H x W`` mask; zeros for an empty mask.

    Coordinates are the first and last foreground pixel indices, SAM's convention
    (``segment_anything.utils.amg.batched_mask_to_box``).
    """
    rows = np.flatnonzero(mask.any(axis=1))
    columns = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return np.zeros(4)
    return np.array([columns[0], rows[0], columns[-1], rows[-1]], dtype=np.float64)


def masks_to_boxes(masks: np.ndarray) -> np.ndarray:
    """Tight XYXY boxes ``N x 4`` (float32) of ``N x H x W`` masks, as ``mask_box``."""
    boxes = np.zeros((masks.shape[0], 4), dtype=np.float32)
    for index, mask in enumerate(masks):
        boxes[index] = mask_box(mask)
    return boxes
