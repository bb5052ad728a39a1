"""PNG overlays of an image, its prompt, and predicted and ground-truth masks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from samkd.files import atomic_path

GROUND_TRUTH_COLOUR = np.array([0, 200, 0], dtype=np.float32)
PREDICTION_COLOUR = np.array([230, 30, 30], dtype=np.float32)


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


def save_png(picture: Image.Image, path: Path) -> None:
    """Write a PNG under a temporary name, then rename, so no half-written file remains."""
    with atomic_path(path) as temporary:
        picture.save(temporary, format="PNG")
