"""Decoding object masks: PNG images, instance label images, COCO polygons and COCO/SA-1B
run-length encodings.

Every decoder returns an ``H x W`` bool array (a label image: ``H x W`` ids) and raises
``DataError`` (one line naming the file) when the mask cannot be used: unreadable, wrong
size, empty, or malformed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from PIL import Image
from pycocotools import mask as coco_mask

from samkd.data.errors import DataError
from samkd.data.images import IMAGE_DECODE_ERRORS

Decoded = TypeVar("Decoded")

MASK_THRESHOLD = 0.5
"""Default ``mask_threshold``: half the range of a greyscale mask's format."""

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I")


def check_mask_threshold(threshold: float) -> float:
    """Return ``threshold`` if it is a finite fraction in ``(0, 1]``, else raise ``ValueError``."""
    if not (isinstance(threshold, (int, float)) and math.isfinite(threshold)):
        raise ValueError(f"mask_threshold must be a finite number, got {threshold!r}")
    if not 0 < threshold <= 1:
        raise ValueError(f"mask_threshold must be in (0, 1], got {threshold!r}")
    return float(threshold)


def load_png_mask(
    path: Path, image_size: tuple[int, int], threshold: float = MASK_THRESHOLD
) -> np.ndarray:
    """Read one object's mask image, of size ``(H, W)``, as an ``H x W`` bool array.

    A pixel is foreground when its level is at least ``threshold`` times the full range of
    the format (255 for 8-bit, 65535 for 16-bit): at the default 0.5, ``>= 128`` or
    ``>= 32768``, so anti-aliased edges split at half intensity. Binary masks are read as
    they are: 1-bit images and masks whose only levels are 0 and 1 (0/255 masks pass any
    threshold). The level of a pixel is, by mode:

    * ``L``, ``LA``, ``I;16``, ``I``: its grey value (alpha ignored);
    * ``RGB``, ``RGBA``: its brightest colour channel, so a coloured object counts (alpha
      ignored);
    * ``P`` with a grey palette: the grey value of its colour; ``P`` with colour entries is
      a label map (index 0 background), where every index other than 0 is foreground.

    Raises:
        DataError: the file is unreadable or of another mode, its size differs from the
            image, or no pixel is foreground.
    """
    levels, full_range = read_image_file(path, mask_levels, "mask", "mask file not found")
    check_mask(levels, image_size, path, "mask")
    mask = threshold_levels(levels, full_range, threshold)
    if not mask.any():
        raise DataError(
            path,
            f"mask is empty at mask_threshold {threshold:g} "
            f"(brightest pixel {int(levels.max())} of {full_range})",
        )
    return mask


def read_image_file(
    path: Path, read: Callable[[Image.Image, Path], Decoded], what: str, missing: str
) -> Decoded:
    """`read(image, path)` of the image file at `path`. A missing file is a `DataError` saying
    `missing`; an undecodable one, a `DataError` that calls it `what` (`mask`, ...)."""
    try:
        with Image.open(path) as image:
            image.load()
            return read(image, path)
    except DataError:
        raise  # a DataError is a ValueError, which IMAGE_DECODE_ERRORS would rewrap
    except FileNotFoundError as error:
        raise DataError(path, missing) from error
    except IMAGE_DECODE_ERRORS as error:
        raise DataError(path, f"{what} cannot be read as an image ({error})") from error


def mask_levels(image: Image.Image, path: Path) -> tuple[np.ndarray, int]:
    """``H x W`` integer levels of a mask image and the full range of its format.

    A range of 1 means the levels are already foreground (1) or background (0).

    Raises:
        DataError: a mode no mask PNG has (``F``, ``CMYK``, ...).
    """
    mode = image.mode
    if mode == "1":
        return np.asarray(image, dtype=np.uint8), 1
    if mode in ("L", "LA"):
        return np.asarray(image.getchannel(0)), 255
    if mode in _SIXTEEN_BIT_MODES:
        # Pillow opens 16-bit greyscale PNGs as I;16 or I; neither holds more than 16 bits.
        return np.asarray(image).astype(np.int64), 65535
    if mode in ("RGB", "RGBA"):
        return np.asarray(image)[:, :, :3].max(axis=2), 255
    if mode == "P":
        return _palette_levels(image)
    raise DataError(
        path, f"mask image mode {mode} is not supported (expected 1-bit, grey, palette or RGB)"
    )


def _palette_levels(image: Image.Image) -> tuple[np.ndarray, int]:
    indices = np.asarray(image)
    palette = np.asarray(image.getpalette("RGB") or [], dtype=np.uint8).reshape(-1, 3)
    used = np.unique(indices)
    if used.max() < len(palette):
        colours = palette[used]
        if (colours == colours[:, :1]).all():
            return palette[indices, 0], 255
    return (indices > 0).astype(np.uint8), 1


def threshold_levels(levels: np.ndarray, full_range: int, threshold: float) -> np.ndarray:
    """Foreground of ``H x W`` mask levels: ``levels >= threshold * full_range``.

    Levels that are all 0 or 1 are a binary mask and kept as they are, whatever the range.
    """
    if levels.max(initial=0) <= 1:
        return levels > 0
    return levels >= threshold * full_range


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


def load_label_image(path: Path, image_size: tuple[int, int]) -> np.ndarray:
    """Read an instance label image of size ``(H, W)`` as ``H x W`` int64 object ids.

    0 is background and every other id one object. The file is one image with one channel
    of integer ids, read with Pillow: 8- or 16-bit greyscale or 32-bit integer PNG or TIFF,
    a palette PNG (its indices are the ids) or a 1-bit image. Colour, float and multi-page
    images are refused rather than guessed at.

    Raises:
        DataError: the file is unreadable, of another kind, has negative ids, or its size
            differs from the image.
    """
    labels = read_image_file(path, _label_array, "label image", "label image not found")
    if labels.shape != tuple(image_size):
        raise DataError(
            path,
            f"label image is {_format_size(labels.shape)} but its image is "
            f"{_format_size(image_size)}",
        )
    lowest = int(labels.min(initial=0))
    if lowest < 0:
        raise DataError(path, f"label image has negative ids (lowest {lowest}); expected ids >= 0")
    return labels


def _label_array(image: Image.Image, path: Path) -> np.ndarray:
    frames = getattr(image, "n_frames", 1)
    if frames > 1:
        raise DataError(path, f"label image has {frames} pages; expected a single 2-D image")
    if image.mode in ("1", "L", "P", *_SIXTEEN_BIT_MODES):
        return np.asarray(image).astype(np.int64)
    raise DataError(
        path,
        f"label image mode {image.mode} is not supported (expected one channel of integer "
        "ids: 8-, 16- or 32-bit greyscale, or palette)",
    )


def label_ids(labels: np.ndarray) -> list[int]:
    """The object ids of an ``H x W`` label image, ascending: every value but 0."""
    return [int(value) for value in np.unique(labels) if value != 0]


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
