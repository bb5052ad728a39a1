"""Prompts sampled from object masks: boxes, positive and negative points.

All randomness comes from a ``numpy.random.Generator`` seeded from ``(seed, index, stream)``,
so the prompts of a sample depend only on the seed and the sample index, never on global
state, worker count or loading order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from samkd.data.masks import mask_box

PromptMode = Literal["box", "points", "mixed"]
PromptKind = Literal["box", "points"]
NegativeRegion = Literal["box", "image"]

# Separate streams keep object selection stable when prompt settings change.
_SELECTION_STREAM = 0
_PROMPT_STREAM = 1

PADDING_LABEL = -1
"""Label of a padding point, the value SAM's prompt encoder treats as "not a point"."""

SINGLE_CLICK_NEGATIVES = (
    "negative points need max_points >= 2: a prompt of one positive point is a single click "
    "(SAM's ambiguous prompt) and takes no negative points"
)


def make_rng(seed: int, index: int, stream: int) -> np.random.Generator:
    """A generator that depends only on ``(seed, index, stream)`` (all non-negative)."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be non-negative, got {seed} and {index}")
    return np.random.default_rng((seed, index, stream))


def select_objects(
    num_objects: int, max_objects: int | None, *, seed: int, index: int
) -> np.ndarray:
    """Indices (ascending) of at most ``max_objects`` of ``num_objects`` objects.

    All objects are kept when there are at most ``max_objects``; otherwise a random subset
    determined by ``(seed, index)`` is kept.
    """
    if max_objects is not None and max_objects < 0:
        raise ValueError(f"max_objects must be >= 0, got {max_objects}")
    if max_objects is None or num_objects <= max_objects:
        return np.arange(num_objects)
    rng = make_rng(seed, index, _SELECTION_STREAM)
    return np.sort(rng.choice(num_objects, size=max_objects, replace=False))


@dataclass(frozen=True)
class Prompts:
    """Prompts for ``N`` objects, in the coordinate frame of the masks they came from.

    Attributes:
        boxes: ``N x 4`` float XYXY boxes (jittered), given for every object.
        point_coords: ``N x K x 2`` float ``(x, y)`` points; positives first, then
            negatives, then padding.
        point_labels: ``N x K`` int64, 1 positive, 0 negative, -1 padding.
        kinds: the prompt each object should be given to the model, ``"box"`` or
            ``"points"``; the points of a ``"box"`` object are all padding.
    """

    boxes: np.ndarray
    point_coords: np.ndarray
    point_labels: np.ndarray
    kinds: tuple[PromptKind, ...]


@dataclass(frozen=True)
class PromptSampler:
    """Samples a box or points prompt for each object mask.

    Args:
        mode: ``"box"`` and ``"points"`` give every object that prompt; ``"mixed"`` picks
            per object, a box with probability ``box_probability``.
        box_jitter: each box edge moves by up to this fraction of the box side (uniform),
            then the box is clipped to the image.
        min_positive: fewest positive points per ``"points"`` object.
        max_positive: most positive points; the count is uniform in
            ``[min_positive, max_positive]``.
        num_negative: negative points, outside the mask, of each ``"points"`` object with
            two or more positive points. One positive point stays a single click, SAM's
            ambiguous prompt, whose loss trains the three multimask outputs (as SAM and
            SAM 2 train their first click): with negatives added, no prompt would be one.
        negative_region: draw negatives inside the jittered box (``"box"``, falling back
            to the whole image when the mask fills the box) or anywhere (``"image"``).
        box_probability: chance of a box in ``"mixed"`` mode.
    """

    mode: PromptMode = "mixed"
    box_jitter: float = 0.1
    min_positive: int = 1
    max_positive: int = 1
    num_negative: int = 0
    negative_region: NegativeRegion = "box"
    box_probability: float = 0.5

    def __post_init__(self) -> None:
        if self.mode not in ("box", "points", "mixed"):
            raise ValueError(f"mode must be 'box', 'points' or 'mixed', got {self.mode!r}")
        if self.negative_region not in ("box", "image"):
            raise ValueError(
                f"negative_region must be 'box' or 'image', got {self.negative_region!r}"
            )
        if not 1 <= self.min_positive <= self.max_positive:
            raise ValueError("need 1 <= min_positive <= max_positive")
        if self.num_negative < 0 or self.box_jitter < 0:
            raise ValueError("num_negative and box_jitter must be >= 0")
        if self.num_negative and self.max_positive == 1:
            raise ValueError(SINGLE_CLICK_NEGATIVES)
        if not 0.0 <= self.box_probability <= 1.0:
            raise ValueError("box_probability must be in [0, 1]")

    @property
    def points_per_object(self) -> int:
        """``K``, the padded number of points per object."""
        return 0 if self.mode == "box" else self.max_positive + self.num_negative

    def sample(self, masks: np.ndarray, *, seed: int, index: int) -> Prompts:
        """Prompts for ``N x H x W`` bool masks (each non-empty), fixed by ``(seed, index)``."""
        rng = make_rng(seed, index, _PROMPT_STREAM)
        num_objects, num_points = masks.shape[0], self.points_per_object
        boxes = np.zeros((num_objects, 4), dtype=np.float64)
        coords = np.zeros((num_objects, num_points, 2), dtype=np.float64)
        labels = np.full((num_objects, num_points), PADDING_LABEL, dtype=np.int64)
        kinds: list[PromptKind] = []
        for obj, mask in enumerate(masks):
            kind = self._choose_kind(rng)
            boxes[obj] = jitter_box(mask_box(mask), self.box_jitter, mask.shape, rng)
            if kind == "points":
                self._sample_points(mask, boxes[obj], rng, coords[obj], labels[obj])
            kinds.append(kind)
        return Prompts(boxes, coords, labels, tuple(kinds))

    def _choose_kind(self, rng: np.random.Generator) -> PromptKind:
        if self.mode == "mixed":
            return "box" if rng.random() < self.box_probability else "points"
        return self.mode

    def _sample_points(
        self,
        mask: np.ndarray,
        box: np.ndarray,
        rng: np.random.Generator,
        coords: np.ndarray,
        labels: np.ndarray,
    ) -> None:
        num_positive = int(rng.integers(self.min_positive, self.max_positive + 1))
        positives = sample_pixels(mask, num_positive, rng)
        coords[:num_positive] = positives
        labels[:num_positive] = 1
        if self.num_negative == 0 or num_positive == 1:
            return
        negatives = self._sample_negatives(mask, box, rng)
        end = num_positive + len(negatives)
        coords[num_positive:end] = negatives
        labels[num_positive:end] = 0

    def _sample_negatives(
        self, mask: np.ndarray, box: np.ndarray, rng: np.random.Generator
    ) -> np.ndarray:
        background = ~mask
        if self.negative_region == "box":
            x0, y0, x1, y1 = np.round(box).astype(int)
            in_box = np.zeros_like(mask)
            in_box[y0 : y1 + 1, x0 : x1 + 1] = True
            if (background & in_box).any():
                background &= in_box
        if not background.any():
            return np.zeros((0, 2))
        return sample_pixels(background, self.num_negative, rng)


def sample_pixels(region: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count x 2`` ``(x, y)`` pixel coordinates drawn from the True pixels of ``region``.

    Draws without replacement when the region has enough pixels.
    """
    flat = np.flatnonzero(region)
    chosen = rng.choice(flat, size=count, replace=flat.size < count)
    rows, columns = np.unravel_index(chosen, region.shape)
    return np.stack([columns, rows], axis=1).astype(np.float64)


def jitter_box(
    box: np.ndarray, jitter: float, image_shape: tuple[int, ...], rng: np.random.Generator
) -> np.ndarray:
    """Move each edge of an XYXY box by up to ``jitter`` times the box side, then clip.

    The result stays inside ``[0, W - 1] x [0, H - 1]`` and keeps ``x0 <= x1, y0 <= y1``.
    """
    height, width = image_shape[:2]
    side_x = max(box[2] - box[0], 1.0)
    side_y = max(box[3] - box[1], 1.0)
    scale = np.array([side_x, side_y, side_x, side_y]) * jitter
    moved = box + rng.uniform(-1.0, 1.0, size=4) * scale
    moved[[0, 2]] = np.clip(np.sort(moved[[0, 2]]), 0, width - 1)
    moved[[1, 3]] = np.clip(np.sort(moved[[1, 3]]), 0, height - 1)
    return moved


def _squared_distance_1d(values: np.ndarray) -> np.ndarray:
    """Exact 1D squared distance transform of each row of ``values`` (``R x n``).

    ``out[r, q] = min_p (q - p)^2 + values[r, p]``, computed with the lower envelope of
    parabolas (Felzenszwalb & Huttenlocher, 2012), vectorised over rows.
    """
    num_rows, length = values.shape
    rows = np.arange(num_rows)
    positions = np.arange(length, dtype=np.float64)
    offsets = values + positions**2
    vertices = np.zeros((num_rows, length), dtype=np.int64)
    bounds = np.full((num_rows, length + 1), np.inf)
    bounds[:, 0] = -np.inf
    top = np.zeros(num_rows, dtype=np.int64)

    def intersection(q: int, active: np.ndarray) -> np.ndarray:
        vertex = vertices[active, top[active]]
        return (offsets[active, q] - offsets[active, vertex]) / (2.0 * (q - vertex))

    for q in range(1, length):
        crossing = intersection(q, rows)
        hidden = crossing <= bounds[rows, top]
        while hidden.any():
            # Parabolas hidden by the new one leave the envelope.
            top[hidden] -= 1
            crossing[hidden] = intersection(q, rows[hidden])
            hidden = crossing <= bounds[rows, top]
        top += 1
        vertices[rows, top] = q
        bounds[rows, top] = crossing
        bounds[rows, top + 1] = np.inf

    result = np.empty_like(values)
    segment = np.zeros(num_rows, dtype=np.int64)
    for q in range(length):
        behind = bounds[rows, segment + 1] < q
        while behind.any():
            segment[behind] += 1
            behind = bounds[rows, segment + 1] < q
        vertex = vertices[rows, segment]
        result[:, q] = (q - vertex) ** 2 + values[rows, vertex]
    return result


def distance_transform(mask: np.ndarray) -> np.ndarray:
    """Euclidean distance from each pixel of an ``H x W`` mask to the nearest background pixel.

    Pixels outside the image count as background, so a mask touching the border is
    measured to the border. Background pixels get 0. Exact (not chamfer-approximated):
    two separable passes of the 1D squared distance transform, over the mask's bounding
    box plus a one-pixel margin only.
    """
    distance = np.zeros(mask.shape, dtype=np.float64)
    rows = np.flatnonzero(mask.any(axis=1))
    columns = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return distance
    crop = mask[rows[0] : rows[-1] + 1, columns[0] : columns[-1] + 1]
    padded = np.pad(crop, 1)
    # Finite stand-in for infinity: larger than any squared distance in the crop.
    far = float(padded.shape[0] ** 2 + padded.shape[1] ** 2)
    squared = np.where(padded, far, 0.0)
    squared = _squared_distance_1d(squared.T).T
    squared = _squared_distance_1d(squared)
    distance[rows[0] : rows[-1] + 1, columns[0] : columns[-1] + 1] = np.sqrt(squared[1:-1, 1:-1])
    return distance


def farthest_from_boundary_point(mask: np.ndarray) -> tuple[int, int]:
    """``(x, y)`` of the mask pixel farthest from the background (first in row-major order
    among ties), a prompt point well inside the object.

    Raises:
        ValueError: the mask is empty.
    """
    if not mask.any():
        raise ValueError("mask is empty")
    distance = distance_transform(mask)
    row, column = np.unravel_index(int(np.argmax(distance)), distance.shape)
    return int(column), int(row)
