"""PNG overlays: an image with its objects' ground truth, predicted masks, prompts and IoUs.

`draw_objects` makes one panel per image and model, readable with hundreds of small objects:
the image dimmed, each ground-truth mask as a thin white outline, each predicted mask as an
outline in its own colour, the prompt in the same colour (box, or points: a dot for a
positive click, a ring for a negative one), and the object's IoU written in its colour at the
top left of its ground truth. Small images are drawn enlarged, huge ones reduced, so that
outlines and numbers keep a readable size. `side_by_side` puts panels (student, teacher) in
one picture. `draw_overlay` tints one object's masks (`samkd view`), `draw_masks` fills many
(automatic masks).
"""

from __future__ import annotations

import colorsys
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from samkd.evaluate.metrics import mask_iou
from samkd.evaluate.predict import ObjectPrompts
from samkd.files import atomic_path

# `draw_overlay`'s tints of one object's ground truth and prediction.
TINT_GROUND_TRUTH = np.array([0, 200, 0], dtype=np.float32)
TINT_PREDICTION = np.array([230, 30, 30], dtype=np.float32)
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

# The long side of a drawn panel is brought into this range by a whole factor.
MIN_LONG_SIDE = 768
MAX_LONG_SIDE = 2048
IMAGE_BRIGHTNESS = 0.6  # the image is dimmed so that outlines and numbers stand out
GROUND_TRUTH_COLOUR = (255, 255, 255)
OUTLINE_WIDTH = 2  # of predicted masks, in drawn pixels; ground truth gets 1 (2 enlarged)
LABEL_SIZE = 12
TITLE_SIZE = 15
TITLE_HEIGHT = TITLE_SIZE + 2 * LABEL_SIZE + 16
POINT_RADIUS = 4
PANEL_GAP = 8
BACKGROUND = (32, 32, 32)
LEGEND = "white: ground truth, colour: prediction and prompt, number: IoU"


def object_colour(index: int) -> tuple[int, int, int]:
    """A bright colour for object `index`; neighbours in the list differ clearly in hue
    (golden-ratio steps around the colour wheel)."""
    hue = (index * 0.618033988749895) % 1.0
    red, green, blue = colorsys.hsv_to_rgb(hue, 0.75, 1.0)
    return round(red * 255), round(green * 255), round(blue * 255)


def display_scale(height: int, width: int) -> tuple[int, int]:
    """`(up, down)`: a panel shows the image enlarged `up` times or reduced `down` times
    (one of them 1), so that its long side reaches `MIN_LONG_SIDE` without passing
    `MAX_LONG_SIDE` where it can."""
    long_side = max(height, width)
    if long_side < MIN_LONG_SIDE:
        return max(1, min(math.ceil(MIN_LONG_SIDE / long_side), MAX_LONG_SIDE // long_side)), 1
    return 1, math.ceil(long_side / MAX_LONG_SIDE)


def outline(mask: np.ndarray, width: int) -> np.ndarray:
    """The pixels of `mask` (`H x W` bool) within `width` 4-connected steps of its outside."""
    inner = mask
    for _ in range(width):
        padded = np.pad(inner, 1, constant_values=False)
        inner = inner & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~inner


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


class _Canvas:
    """A panel being drawn: the image scaled for display, and the map from image pixels to
    drawn pixels."""

    def __init__(self, image: np.ndarray) -> None:
        self.up, self.down = display_scale(image.shape[0], image.shape[1])
        shown = self.to_display(image)
        self.pixels = shown.astype(np.float32) * IMAGE_BRIGHTNESS

    def to_display(self, array: np.ndarray) -> np.ndarray:
        """`array` (`H x W [x C]`) at display size: repeated `up` times, or every `down`-th
        pixel kept."""
        if self.down > 1:
            return array[:: self.down, :: self.down]
        return array.repeat(self.up, axis=0).repeat(self.up, axis=1)

    def point(self, x: float, y: float) -> tuple[float, float]:
        """Drawn coordinates of the centre of image pixel `(x, y)`."""
        return ((x + 0.5) * self.up / self.down, (y + 0.5) * self.up / self.down)

    def paint_outline(self, mask: np.ndarray, colour: tuple[int, int, int], width: int) -> None:
        """Paint the outline of `mask` (`H x W` bool, image frame), working on the box of
        the mask only (cheap for small objects)."""
        rows, columns = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        if rows.size == 0:
            return
        top, bottom = rows[0] - (rows[0] % self.down), rows[-1] + 1
        left, right = columns[0] - (columns[0] % self.down), columns[-1] + 1
        region = self.to_display(mask[top:bottom, left:right])
        band = outline(region, width)
        y0, x0 = top * self.up // self.down, left * self.up // self.down
        target = self.pixels[y0 : y0 + band.shape[0], x0 : x0 + band.shape[1]]
        target[band[: target.shape[0], : target.shape[1]]] = colour


def draw_objects(
    image: np.ndarray,
    targets: torch.Tensor,
    predicted: torch.Tensor,
    prompts: ObjectPrompts | None,
    title: str,
) -> Image.Image:
    """One panel: `image` (`H x W x 3` uint8) with every object of `targets` (`N x H x W`
    bool) outlined in white, its predicted mask (`predicted`, `N x H x W` bool) outlined in
    the object's colour, its prompt (`prompts`, original-image coordinates) and its IoU; a
    title line above, followed by the mean IoU and the number of objects and empty masks."""
    canvas = _Canvas(image)
    targets_np, predicted_np = targets.bool().numpy(), predicted.bool().numpy()
    ious = mask_iou(predicted, targets).tolist()
    truth_width = 1 if canvas.up < 2 else 2
    for target in targets_np:
        canvas.paint_outline(target, GROUND_TRUTH_COLOUR, truth_width)
    for index, mask in enumerate(predicted_np):
        canvas.paint_outline(mask, object_colour(index), OUTLINE_WIDTH)
    picture = Image.fromarray(canvas.pixels.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    if prompts is not None:
        _draw_prompts(draw, canvas, prompts)
    _draw_ious(draw, canvas, targets_np, ious, picture.size)
    empty = sum(not mask.any() for mask in predicted_np)
    mean = sum(ious) / len(ious) if ious else float("nan")
    summary = f"mIoU {mean:.3f}, {len(ious)} objects, {empty} empty predictions"
    return titled(picture, title, summary)


def _draw_prompts(draw: ImageDraw.ImageDraw, canvas: _Canvas, prompts: ObjectPrompts) -> None:
    """Boxes as thin rectangles, points as dots (positive) or rings (negative)."""
    for index in range(len(prompts)):
        colour = object_colour(index)
        if prompts.boxes is not None:
            x0, y0, x1, y1 = prompts.boxes[index].tolist()
            (left, top), (right, bottom) = canvas.point(x0, y0), canvas.point(x1, y1)
            draw.rectangle([left, top, right, bottom], outline=colour, width=1)
        if prompts.point_coords is None or prompts.point_labels is None:
            continue
        for (x, y), label in zip(
            prompts.point_coords[index].tolist(), prompts.point_labels[index].tolist(), strict=True
        ):
            if label not in (0, 1):  # padding
                continue
            cx, cy = canvas.point(x, y)
            circle = [cx - POINT_RADIUS, cy - POINT_RADIUS, cx + POINT_RADIUS, cy + POINT_RADIUS]
            if label == 1:
                draw.ellipse(circle, fill=colour, outline=(0, 0, 0), width=1)
            else:
                draw.ellipse(circle, outline=colour, width=2)


def _draw_ious(
    draw: ImageDraw.ImageDraw,
    canvas: _Canvas,
    targets: np.ndarray,
    ious: Sequence[float],
    size: tuple[int, int],
) -> None:
    """Each object's IoU in its colour, at the top left of its ground truth, outlined in
    black so that it reads on any background; `size`: the panel's `(width, height)`."""
    font = _font(LABEL_SIZE)
    width, height = size
    for index, (target, iou) in enumerate(zip(targets, ious, strict=True)):
        rows, columns = np.flatnonzero(target.any(axis=1)), np.flatnonzero(target.any(axis=0))
        if rows.size == 0:
            continue
        x, y = canvas.point(columns[0], rows[0])
        text = f"{iou:.2f}"[1:] if 0 <= iou < 1 else f"{iou:.1f}"  # ".83", "1.0"
        left = min(max(0.0, x - 2), width - LABEL_SIZE * 2)
        top = min(max(0.0, y - LABEL_SIZE - 2), height - LABEL_SIZE - 2)
        draw.text(
            (left, top), text, fill=object_colour(index), font=font,
            stroke_width=2, stroke_fill=(0, 0, 0),
        )  # fmt: skip


def titled(picture: Image.Image, title: str, summary: str, legend: str = LEGEND) -> Image.Image:
    """`picture` below two lines of text: `title`, then `summary` and `legend`."""
    width = max(picture.width, 480)
    framed = Image.new("RGB", (width, picture.height + TITLE_HEIGHT), BACKGROUND)
    framed.paste(picture, (0, TITLE_HEIGHT))
    draw = ImageDraw.Draw(framed)
    font = _font(TITLE_SIZE)
    draw.text((6, 4), title, fill=(255, 255, 255), font=font)
    small = _font(LABEL_SIZE)
    draw.text((6, 8 + TITLE_SIZE), summary, fill=(220, 220, 220), font=small)
    draw.text((6, 11 + TITLE_SIZE + LABEL_SIZE), legend, fill=(170, 170, 170), font=small)
    return framed


def side_by_side(panels: Sequence[Image.Image]) -> Image.Image:
    """The panels in a row, top-aligned, on a dark background."""
    width = sum(panel.width for panel in panels) + PANEL_GAP * (len(panels) - 1)
    height = max(panel.height for panel in panels)
    picture = Image.new("RGB", (width, height), BACKGROUND)
    left = 0
    for panel in panels:
        picture.paste(panel, (left, 0))
        left += panel.width + PANEL_GAP
    return picture


def draw_overlay(
    image: np.ndarray,
    predicted: torch.Tensor,
    target: torch.Tensor,
    box: torch.Tensor | None = None,
) -> Image.Image:
    """One object: ground truth tinted green, prediction tinted red (overlap looks brown),
    box in yellow.

    image: `H x W x 3` uint8; predicted, target: `H x W` bool; box: `4` XYXY or None.
    """
    canvas = image.astype(np.float32)
    for mask, colour in ((target, TINT_GROUND_TRUTH), (predicted, TINT_PREDICTION)):
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


def image_file_name(image_id: str, suffix: str = "") -> str:
    """The PNG file name of an image's overlay: its id (path separators replaced)."""
    return image_id.replace("/", "_").replace("\\", "_") + suffix + ".png"


def save_png(picture: Image.Image, path: Path) -> None:
    """Write a PNG under a temporary name, then rename, so no half-written file remains."""
    with atomic_path(path) as temporary:
        picture.save(temporary, format="PNG")
