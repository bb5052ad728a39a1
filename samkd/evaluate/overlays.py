"""PNG overlays of an image, its prompt, and predicted and ground-truth masks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from samkd.files import atomic_path

GROUND_TRUTH_COLOUR = np.array([0, 200, 0], dtype=np.float32)
PREDICTION_COLOUR = np.array([230, 30, 30], dtype=np.float32)
# Distinct colours for many masks of one image (matplotlib's tab10), used in turn.
MASK_PALETTE = np.array(
    [
        [31, 119, 180],
        [255, 127, 14],
        [44, 160, 44],
        [214, 39, 40],
        [148, 103, 189],
        [140, 86, 75],
        [227, 119, 194],
        [127, 127, 127],
        [188, 189, 34],
        [23, 190, 207],
    ],
    dtype=np.float32,
)


def draw_overlay(
    image: np.ndarray,
    predicted: torch.Tensor,
    target: torch.Tensor,
    box: torch.Tensor | None = None,
) -> Image.Image:
    """Ground truth tinted green, prediction tinted red (overlap looks brown), box in yellow.

    image: `H x W x 3` uint8; predicted, target: `H x W` bool; box: `4` XYXY or None.
    """
    canvas = image.astype(np.float32)
    for mask, colour in ((target, GROUND_TRUTH_COLOUR), (predicted, PREDICTION_COLOUR)):
        selected = mask.numpy()
        canvas[selected] = 0.55 * canvas[selected] + 0.45 * colour
    picture = Image.fromarray(canvas.clip(0, 255).astype(np.uint8))
    if box is not None:
        ImageDraw.Draw(picture).rectangle([float(v) for v in box], outline=(255, 220, 0), width=2)
    return picture


def draw_masks(image: np.ndarray, masks: np.ndarray) -> Image.Image:
    """Each mask tinted its own colour, largest first so that small masks stay visible.

    image: `H x W x 3` uint8; masks: `N x H x W` bool.
    """
    canvas = image.astype(np.float32)
    areas = masks.reshape(masks.shape[0], -1).sum(axis=1)
    for rank, index in enumerate(np.argsort(-areas, kind="stable")):
        selected = masks[index]
        colour = MASK_PALETTE[rank % len(MASK_PALETTE)]
        canvas[selected] = 0.45 * canvas[selected] + 0.55 * colour
    return Image.fromarray(canvas.clip(0, 255).astype(np.uint8))


def save_png(picture: Image.Image, path: Path) -> None:
    """Write a PNG under a temporary name, then rename, so no half-written file remains."""
    with atomic_path(path) as temporary:
        picture.save(temporary, format="PNG")
