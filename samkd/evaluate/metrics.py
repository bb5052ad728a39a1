"""Mask IoU, Dice and boundary IoU, and their means by prompt kind, output mode and object size.

Boundary IoU follows Cheng et al., 2021 ("Boundary IoU: Improving Object-Centric Image
Segmentation Evaluation") and the authors' ``mask_to_boundary``: each mask is reduced to its
contour band, the pixels of the mask within ``d`` of its own contour (``G_d`` intersected with
``G``, not the band on both sides), ``d = round(0.02 x image diagonal)`` and at least 1, and
the score is the IoU of the two bands. As there, distance is measured in a ``(2d + 1)``
square window (``d`` erosions by a 3 x 3 square) and the image border counts as contour, so
a mask cut by the border has a band along it. The bands are exact, computed from a
summed-area table on the masks' device at a cost that does not grow with ``d``, within the
box of the two masks.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

# COCO's object-size thresholds, in pixels of the original image.
SMALL_AREA = 32**2
LARGE_AREA = 96**2
SIZE_NAMES = ("small", "medium", "large")

BOUNDARY_DILATION_RATIO = 0.02
"""Width of boundary IoU's contour band as a fraction of the image diagonal (the paper's)."""

# Masks whose contour bands are computed at once: bounds the int32 summed-area tables.
_BOUNDARY_CHUNK = 16

DICE = "dice"
BOUNDARY_IOU = "boundary_iou"
IMAGE_MIOU = "image_miou"
EXTRA_METRICS = (IMAGE_MIOU, DICE, BOUNDARY_IOU)
"""Means reported beside mIoU: per-image mIoU, per-object Dice and boundary IoU."""
METRIC_TITLES = {IMAGE_MIOU: "image mIoU", DICE: "Dice", BOUNDARY_IOU: "boundary IoU"}

EMPTY_FRACTION = "empty_fraction"
EMPTY_WARNING_ABOVE = 0.5
"""Above this share of objects with an empty predicted mask, evaluation says so."""


def empty_masks(predicted: torch.Tensor) -> torch.Tensor:
    """Which of the `... x H x W` boolean masks have no pixel (`...` bool)."""
    return ~predicted.bool().flatten(-2).any(-1)


def empty_mask_warning(fraction: float | None, what: str = "") -> str | None:
    """The one line that says a model predicts empty masks for most objects (None: for at
    most `EMPTY_WARNING_ABOVE` of them). `what`: which predictions, e.g. "box prompts"."""
    if fraction is None or not fraction > EMPTY_WARNING_ABOVE:
        return None
    where = f" ({what})" if what else ""
    return (
        f"the model predicts empty masks for {fraction:.0%} of objects{where}: undertrained "
        "or wrong input scale?"
    )


def mask_iou(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Intersection over union of boolean masks.

    predicted, target: `... x H x W` boolean. Returns `...` float32. Two empty masks have
    IoU 1 (they agree perfectly); one empty and one not, 0.
    """
    predicted = predicted.bool()
    target = target.bool()
    intersection = (predicted & target).flatten(-2).sum(-1).float()
    union = (predicted | target).flatten(-2).sum(-1).float()
    return torch.where(union > 0, intersection / union.clamp(min=1), torch.ones_like(union))


def dice_score(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Dice coefficient ``2 |P & T| / (|P| + |T|)`` of boolean masks.

    predicted, target: `... x H x W` boolean. Returns `...` float32; two empty masks score
    1, as in `mask_iou`.
    """
    predicted = predicted.bool()
    target = target.bool()
    intersection = (predicted & target).flatten(-2).sum(-1).float()
    total = predicted.flatten(-2).sum(-1).float() + target.flatten(-2).sum(-1).float()
    return torch.where(total > 0, 2 * intersection / total.clamp(min=1), torch.ones_like(total))


def boundary_width(height: int, width: int, dilation_ratio: float = BOUNDARY_DILATION_RATIO) -> int:
    """Boundary IoU's `d` in pixels for an `height x width` image: `round(dilation_ratio x
    diagonal)`, at least 1."""
    return max(1, round(dilation_ratio * math.hypot(height, width)))


def mask_boundary(masks: torch.Tensor, distance: int) -> torch.Tensor:
    """The contour band of each mask: its pixels with a background pixel, or the outside of
    the image, within `distance` in a `(2 distance + 1)` square window.

    masks: `... x H x W` boolean. Returns `... x H x W` bool, on the masks' device.
    """
    height, width = masks.shape[-2:]
    flat = masks.bool().reshape(math.prod(masks.shape[:-2]), height, width)
    bands = [_contour_band(chunk, distance) for chunk in flat.split(_BOUNDARY_CHUNK)]
    return (torch.cat(bands) if bands else flat.clone()).reshape(masks.shape)


def _contour_band(masks: torch.Tensor, distance: int) -> torch.Tensor:
    """`N x H x W` bool masks -> their contour bands, via a summed-area table of background
    pixels (the outside of the image padded in as background)."""
    background = F.pad((~masks).to(torch.int32), (distance,) * 4, value=1)
    table = background.cumsum(1, dtype=torch.int32).cumsum(2, dtype=torch.int32)
    table = F.pad(table, (1, 0, 1, 0))
    side = 2 * distance + 1
    # Background pixels in the window centred on each pixel, from four corners of the table.
    near_background = (
        table[:, side:, side:]
        - table[:, :-side, side:]
        - table[:, side:, :-side]
        + table[:, :-side, :-side]
    )
    return masks & (near_background > 0)


def boundary_iou(
    predicted: torch.Tensor,
    target: torch.Tensor,
    dilation_ratio: float = BOUNDARY_DILATION_RATIO,
) -> torch.Tensor:
    """Boundary IoU (Cheng et al., 2021): the IoU of the two masks' contour bands of width
    `boundary_width` (see the module docstring).

    predicted, target: `... x H x W` boolean. Returns `...` float32; two empty masks score 1.
    Each pair is cropped to the box of both masks grown by `d` first: pixels farther from
    both masks are in neither band and decide none, so the score is exact and its cost
    follows the objects' size rather than the image's.
    """
    height, width = target.shape[-2:]
    distance = boundary_width(height, width, dilation_ratio)
    predicted, target = torch.broadcast_tensors(predicted.bool(), target.bool())
    batch = predicted.shape[:-2]
    pairs = torch.stack([predicted, target], dim=-3).reshape(math.prod(batch), 2, height, width)
    scores = [_cropped_boundary_iou(pair, distance) for pair in pairs]
    stacked = torch.stack(scores) if scores else torch.zeros(0, device=target.device)
    return stacked.reshape(batch)


def _cropped_boundary_iou(pair: torch.Tensor, distance: int) -> torch.Tensor:
    """Boundary IoU of a `2 x H x W` bool mask pair, as a 0-dim float32 tensor."""
    either = pair.any(dim=0)
    rows = torch.nonzero(either.any(dim=1)).flatten()
    columns = torch.nonzero(either.any(dim=0)).flatten()
    if rows.numel() == 0:
        return torch.ones((), device=pair.device)
    top, bottom = max(int(rows[0]) - distance, 0), int(rows[-1]) + distance + 1
    left, right = max(int(columns[0]) - distance, 0), int(columns[-1]) + distance + 1
    bands = mask_boundary(pair[:, top:bottom, left:right], distance)
    return mask_iou(bands[0], bands[1])


def size_bucket(area: int) -> str:
    """COCO's size class of an object of `area` pixels: small, medium or large."""
    if area < SMALL_AREA:
        return "small"
    if area < LARGE_AREA:
        return "medium"
    return "large"


@dataclass
class IoUTable:
    """Running per-object IoUs, grouped by (prompt kind, output mode) and by size, and the
    `EXTRA_METRICS`: each image's mean IoU and each object's Dice and boundary IoU."""

    values: dict[tuple[str, str, str], list[float]] = field(
        default_factory=lambda: defaultdict(list)
    )
    # (metric, prompt, output) -> one value per image (image_miou) or per object.
    extra: dict[tuple[str, str, str], list[float]] = field(
        default_factory=lambda: defaultdict(list)
    )
    # (prompt, output) -> objects whose predicted mask is empty.
    empty: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))

    def add(
        self,
        prompt: str,
        output: str,
        ious: torch.Tensor,
        areas: torch.Tensor,
        *,
        dice: torch.Tensor | None = None,
        boundary_ious: torch.Tensor | None = None,
    ) -> None:
        """Record the IoUs (`N`) of the N objects of one image, whose ground-truth areas are
        `areas` (`N`), and optionally their Dice and boundary IoU (`N` each)."""
        for iou, area in zip(ious.tolist(), areas.tolist(), strict=True):
            self.values[(prompt, output, "all")].append(iou)
            self.values[(prompt, output, size_bucket(int(area)))].append(iou)
        if ious.numel():
            self.extra[(IMAGE_MIOU, prompt, output)].append(ious.float().mean().item())
        for metric, scores in ((DICE, dice), (BOUNDARY_IOU, boundary_ious)):
            if scores is not None:
                self.extra[(metric, prompt, output)].extend(scores.tolist())

    def add_masks(
        self,
        prompt: str,
        output: str,
        predicted: torch.Tensor,
        reference: torch.Tensor,
        areas: torch.Tensor,
    ) -> None:
        """Score one image's predicted masks against reference masks (`N x H x W` boolean
        each) with every metric, and count the empty predictions; `areas` (`N`) are the
        ground-truth areas that set each object's size class."""
        self.empty[(prompt, output)] += int(empty_masks(predicted).sum())
        self.add(
            prompt,
            output,
            mask_iou(predicted, reference),
            areas,
            dice=dice_score(predicted, reference),
            boundary_ious=boundary_iou(predicted, reference),
        )

    def mean(self, prompt: str, output: str, size: str = "all") -> float | None:
        """Mean IoU of a group, or None when it has no objects."""
        found = self.values.get((prompt, output, size))
        return sum(found) / len(found) if found else None

    def metric_mean(self, metric: str, prompt: str, output: str) -> float | None:
        """Mean of one of `EXTRA_METRICS` in a group, or None when it was not measured."""
        found = self.extra.get((metric, prompt, output))
        return sum(found) / len(found) if found else None

    def empty_fraction(self, prompt: str, output: str) -> float | None:
        """The share of a group's objects whose predicted mask is empty (None: no objects)."""
        count = self.count(prompt, output)
        return self.empty.get((prompt, output), 0) / count if count else None

    def most_empty(self) -> tuple[str, float] | None:
        """The group whose predictions are most often empty, as `("box prompts, single
        output", fraction)`; None without objects."""
        fractions = [
            (f"{prompt} prompts, {output} output", fraction)
            for prompt, output in self.groups()
            if (fraction := self.empty_fraction(prompt, output)) is not None
        ]
        return max(fractions, key=lambda item: item[1], default=None)

    def count(self, prompt: str, output: str, size: str = "all") -> int:
        return len(self.values.get((prompt, output, size), ()))

    def groups(self) -> list[tuple[str, str]]:
        """(prompt, output) pairs in the order they were first recorded."""
        seen: dict[tuple[str, str], None] = {}
        for prompt, output, _ in self.values:
            seen.setdefault((prompt, output), None)
        return list(seen)

    def summary(self) -> dict[str, dict[str, dict[str, float | int | None]]]:
        """`{prompt: {output: {"miou": ..., "image_miou": ..., "dice": ...,
        "boundary_iou": ..., "empty_fraction": ..., "count": ..., "miou_small": ...,
        ...}}}`."""
        result: dict[str, dict[str, dict[str, float | int | None]]] = {}
        for prompt, output in self.groups():
            entry: dict[str, float | int | None] = {"miou": self.mean(prompt, output)}
            for metric in EXTRA_METRICS:
                entry[metric] = self.metric_mean(metric, prompt, output)
            entry[EMPTY_FRACTION] = self.empty_fraction(prompt, output)
            entry["count"] = self.count(prompt, output)
            for size in SIZE_NAMES:
                entry[f"miou_{size}"] = self.mean(prompt, output, size)
                entry[f"count_{size}"] = self.count(prompt, output, size)
            result.setdefault(prompt, {})[output] = entry
        return result
