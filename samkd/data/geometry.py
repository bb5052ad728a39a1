"""Geometric augmentation of an image and its masks at original resolution: quarter turns,
crops and zoom (scale jitter).

Turns and crops are exact pixel operations, applied alike to the image and to its masks before
SAM's resize; boxes and prompts are then drawn from the transformed masks, so that all of them
stay aligned with the image. Zoom sets the scale at which SAM's `S x S` input shows the image,
as large-scale jitter does: zoomed in, only the window that fits the input at that scale is
kept; zoomed out, the image's longest side is `zoom x S` and the rest of the input is padding.

A `Geometry` is drawn before the image is read and is defined relative to its size, so masks
read later (a teacher's automatic masks of the image) follow the same transform.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Geometry:
    """One image's geometric transform (the default is the identity).

    Attributes:
        quarter_turns: rotations by 90 degrees in the image plane (``np.rot90``), 0 to 3.
        area: fraction of the turned image's area that the crop keeps, at the image's aspect
            ratio; 1: no crop.
        zoom: the image's scale in SAM's input relative to the usual one (longest side ``S``).
        crop_at: ``(y, x)`` in ``[0, 1]``: where the crop lies in the room the image leaves it.
        zoom_at: ``(y, x)`` in ``[0, 1]``: where the zoomed-in window lies inside the crop.
    """

    quarter_turns: int = 0
    area: float = 1.0
    zoom: float = 1.0
    crop_at: tuple[float, float] = (0.0, 0.0)
    zoom_at: tuple[float, float] = (0.0, 0.0)

    def window(self, size: tuple[int, int]) -> tuple[slice, slice]:
        """Rows and columns kept of the turned image, for an image of ``size`` ``(H, W)``
        (before turning)."""
        height, width = size if self.quarter_turns % 2 == 0 else size[::-1]
        side = math.sqrt(self.area)
        crop = (max(1, round(height * side)), max(1, round(width * side)))
        top, left = _place(crop, (height, width), self.crop_at)
        # Zoomed in by z, the crop's longest side spans z x S: an S-pixel span of it is kept.
        span = max(1, round(max(crop) / max(self.zoom, 1.0)))
        kept = (min(crop[0], span), min(crop[1], span))
        down, right = _place(kept, crop, self.zoom_at)
        rows = slice(top + down, top + down + kept[0])
        return rows, slice(left + right, left + right + kept[1])

    def image(self, image: np.ndarray) -> np.ndarray:
        """An ``H x W x C`` image turned and cropped: ``h x w x C``, contiguous."""
        return self._apply(image, (0, 1))

    def masks(self, masks: np.ndarray) -> np.ndarray:
        """``N x H x W`` masks turned and cropped like the image: ``N x h x w``, contiguous;
        a mask may be left empty."""
        return self._apply(masks, (1, 2))

    def long_side(self, image_size: int) -> int:
        """The resized image's longest side in SAM's ``S x S`` input: ``S``, less zoomed out."""
        return max(1, round(image_size * min(self.zoom, 1.0)))

    def _apply(self, array: np.ndarray, axes: tuple[int, int]) -> np.ndarray:
        rows, columns = self.window((array.shape[axes[0]], array.shape[axes[1]]))
        turned = np.rot90(array, self.quarter_turns, axes=axes)
        index: list[slice] = [slice(None)] * array.ndim
        index[axes[0]], index[axes[1]] = rows, columns
        return np.ascontiguousarray(turned[tuple(index)])


def _place(
    inner: tuple[int, int], outer: tuple[int, int], at: tuple[float, float]
) -> tuple[int, int]:
    """Top-left corner of a box of size ``inner`` inside ``outer``, ``at`` (``[0, 1]``) of the
    way along the room left in each direction."""
    room = (outer[0] - inner[0], outer[1] - inner[1])
    return min(int(at[0] * (room[0] + 1)), room[0]), min(int(at[1] * (room[1] + 1)), room[1])
