"""The page's pictures: the image with its prompts, each model's mask (as `samkd eval`'s
overlays draw it: prediction red, ground truth green), both masks in two colours, and the
multimask choices.

Small images are shown enlarged by a whole factor (nearest neighbour), so each pixel is a
square the user can click; `display_scale` gives the factor, clicks are divided by it.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw

from samkd.evaluate.overlays import MASK_PALETTE, draw_overlay
from samkd.view.predictor import POSITIVE, Prompts

# Images whose long side is below this are enlarged (at most MAX_SCALE times).
DISPLAY_SIDE = 512
MAX_SCALE = 8
THUMBNAIL_SIDE = 256
POSITIVE_COLOUR = (40, 200, 60)
NEGATIVE_COLOUR = (230, 40, 40)
BOX_COLOUR = (255, 220, 0)
OUTLINE = (255, 255, 255)
# The two models' colours when overlaid (matplotlib's tab10 blue and orange).
MODEL_COLOURS = (MASK_PALETTE[0], MASK_PALETTE[1])
MODEL_COLOUR_NAMES = ("blue", "orange")


def display_scale(size: tuple[int, int]) -> int:
    """The whole factor that brings an `(H, W)` image's long side to `DISPLAY_SIDE`."""
    return int(min(MAX_SCALE, max(1, DISPLAY_SIDE // max(size))))


def enlarge(pixels: np.ndarray, scale: int) -> np.ndarray:
    """`H x W x 3` -> `sH x sW x 3`, each pixel a `s x s` square."""
    if scale == 1:
        return pixels
    return np.repeat(np.repeat(pixels, scale, axis=0), scale, axis=1)


def draw_prompts(
    pixels: np.ndarray, prompts: Prompts, scale: int, corner: tuple[int, int] | None = None
) -> np.ndarray:
    """The image enlarged `scale` times with the box (yellow), positive (green) and negative
    (red) points, and the first corner of a box being drawn (`corner`)."""
    picture = Image.fromarray(enlarge(pixels, scale))
    draw = ImageDraw.Draw(picture)
    radius = max(4, min(picture.size) // 80)
    width = max(2, radius // 2)

    def centre(x: int, y: int) -> tuple[float, float]:
        return (x + 0.5) * scale, (y + 0.5) * scale

    if prompts.box is not None:
        x0, y0, x1, y1 = prompts.box
        draw.rectangle(
            [x0 * scale, y0 * scale, (x1 + 1) * scale - 1, (y1 + 1) * scale - 1],
            outline=BOX_COLOUR,
            width=width,
        )
    if corner is not None:
        x, y = centre(*corner)
        draw.line([x - 2 * radius, y, x + 2 * radius, y], fill=BOX_COLOUR, width=width)
        draw.line([x, y - 2 * radius, x, y + 2 * radius], fill=BOX_COLOUR, width=width)
    for click in prompts.clicks:
        x, y = centre(click.x, click.y)
        colour = POSITIVE_COLOUR if click.label == POSITIVE else NEGATIVE_COLOUR
        draw.ellipse(
            [x - radius, y - radius, x + radius, y + radius],
            fill=colour,
            outline=OUTLINE,
            width=max(1, width // 2),
        )
    return np.asarray(picture)


def draw_mask(
    pixels: np.ndarray,
    mask: np.ndarray,
    target: np.ndarray | None,
    prompts: Prompts,
    scale: int,
) -> np.ndarray:
    """One model's mask tinted red over the image, the target object green (`samkd eval`'s
    overlay), with the prompts."""
    empty = np.zeros(mask.shape, dtype=bool)
    target = empty if target is None else target
    overlay = draw_overlay(pixels, torch.from_numpy(mask), torch.from_numpy(target))
    return draw_prompts(np.asarray(overlay), prompts, scale)


def draw_both(
    pixels: np.ndarray, masks: list[np.ndarray], prompts: Prompts, scale: int
) -> np.ndarray:
    """Both models' masks over the image, each in its `MODEL_COLOURS` colour (where they
    overlap, their mix), with the prompts."""
    canvas = pixels.astype(np.float32)
    for mask, colour in zip(masks, MODEL_COLOURS, strict=False):
        canvas[mask] = 0.5 * canvas[mask] + 0.5 * colour
    return draw_prompts(canvas.clip(0, 255).astype(np.uint8), prompts, scale)


def draw_choice(pixels: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """A multimask choice tinted red over the image, at most `THUMBNAIL_SIDE` pixels long."""
    empty = torch.zeros(mask.shape, dtype=torch.bool)
    picture = draw_overlay(pixels, torch.from_numpy(mask), empty)
    picture.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE), Image.Resampling.BILINEAR)
    return np.asarray(picture)
