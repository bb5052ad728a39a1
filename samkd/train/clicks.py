"""Corrective clicks for prompt-in-the-loop training, sampled on the device.

Given the student's current masks and the targets (`B x H x W` bool, one row per object,
at the decoder's low-resolution grid), each object gets one click in the larger error region:
positive (label 1) in the false negatives (target, not predicted), negative (label 0) in the
false positives (predicted, not target); an object without errors gets a padding point
(label -1, "not a point" to SAM's prompt encoder).

- `farthest`: the click goes to the pixel farthest (Euclidean) from the region's border, pixels
  outside the grid counting as border; "larger" means reaching deeper, ties go to the false
  negatives (as RITM's and SAM's click simulators, and `samkd.evaluate.prompts.next_click`).
- `random`: a uniform pixel of the region with more pixels (ties: the false negatives), drawn
  from counter-based noise of `(seed, object, pixel)`: the same under the seed on any device.

Everything is tensor ops on the masks' device: no host-device sync, no host tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from samkd.data.prompts import PADDING_LABEL

ClickMode = Literal["farthest", "random"]

_MASK32 = 0xFFFFFFFF
# The squared-distance brute force holds `chunk x W x H x H` float32 values at once.
_DISTANCE_BUDGET = 1 << 26


@dataclass(frozen=True)
class Clicks:
    """One click per object: `coords` `B x 2` `(x, y)` grid pixels (float32), `labels` `B`
    int64 (1 positive, 0 negative, -1 padding)."""

    coords: torch.Tensor
    labels: torch.Tensor


def hash_uniform(keys: torch.Tensor) -> torch.Tensor:
    """float32 in `[0, 1)` from int64 `keys` (any shape), a fixed integer hash of each key's
    low 32 bits (lowbias32): the same values on every device."""
    x = keys & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    x = x ^ (x >> 16)
    return (x >> 8).float() / float(1 << 24)


def mix_seed(*values: int) -> int:
    """One 31-bit key from several non-negative ints (to offset `hash_uniform`'s keys)."""
    key = 0x2545F491
    for value in values:
        key = ((key ^ (value & _MASK32)) * 0x9E3779B1 + 0x7F4A7C15) & 0x7FFFFFFF
    return key


def _row_distance(region: torch.Tensor) -> torch.Tensor:
    """`B x H x W` float32: distance along each row from a pixel of `region` to the nearest
    pixel outside it (the grid's edges are outside); 0 outside the region."""
    width = region.shape[-1]
    index = torch.arange(width, device=region.device, dtype=torch.float32)
    outside = ~region
    # Last outside column at or left of each pixel (-1: the left edge), first at or right of
    # it (width: the right edge).
    left = torch.where(outside, index, -1.0).cummax(dim=-1).values
    flipped = torch.where(outside, index, float(width)).flip(-1)
    right = (-(-flipped).cummax(dim=-1).values).flip(-1)
    return torch.minimum(index - left, right - index)


def distance_to_border(region: torch.Tensor) -> torch.Tensor:
    """Exact Euclidean distance `B x H x W` (float32) from each pixel of a `B x H x W` bool
    `region` to the nearest pixel outside it, pixels beyond the grid counting as outside;
    0 outside the region (as `samkd.data.distance_transform`).

    Rows first (a running max of the last border pixel), then columns by brute force over
    every pair of rows, in chunks of objects that bound the memory.
    """
    count, height, width = region.shape
    rows = _row_distance(region).square()
    index = torch.arange(height, device=region.device, dtype=torch.float32)
    # (y - y')^2 plus the edges beyond the grid, `H x (H + 2)`.
    beyond = torch.stack([index + 1, height - index], dim=1).square()
    offsets = torch.cat([(index[:, None] - index[None, :]).square(), beyond], dim=1)
    chunk = max(1, _DISTANCE_BUDGET // max(1, width * height * (height + 2)))
    parts = []
    for start in range(0, count, chunk):
        columns = rows[start : start + chunk].transpose(1, 2)  # n x W x H'
        edges = columns.new_zeros(columns.shape[0], width, 2)
        candidates = torch.cat([columns, edges], dim=2)[:, :, None, :] + offsets  # n x W x H x H'
        parts.append(candidates.amin(dim=-1).transpose(1, 2))
    squared = torch.cat(parts) if parts else rows
    return torch.where(region, squared.sqrt(), 0.0)


def _pixel_coords(flat: torch.Tensor, width: int) -> torch.Tensor:
    """`B x 2` float32 `(x, y)` of flat pixel indices `B`."""
    return torch.stack([flat % width, flat // width], dim=1).float()


def _farthest(missed: torch.Tensor, extra: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat pixel `B` and positive flag `B` of the deepest error pixel."""
    depth_missed = distance_to_border(missed).flatten(1)
    depth_extra = distance_to_border(extra).flatten(1)
    positive = depth_missed.amax(dim=1) >= depth_extra.amax(dim=1)
    depth = torch.where(positive[:, None], depth_missed, depth_extra)
    return depth.argmax(dim=1), positive


def _random(
    missed: torch.Tensor, extra: torch.Tensor, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat pixel `B` and positive flag `B` of a seeded uniform pixel of the larger region."""
    missed, extra = missed.flatten(1), extra.flatten(1)
    positive = missed.sum(dim=1) >= extra.sum(dim=1)
    region = torch.where(positive[:, None], missed, extra)
    count, pixels = region.shape
    keys = torch.arange(count * pixels, device=region.device).reshape(count, pixels) + seed
    noise = torch.where(region, hash_uniform(keys), -1.0)
    return noise.argmax(dim=1), positive


def sample_clicks(
    predicted: torch.Tensor,
    target: torch.Tensor,
    mode: ClickMode = "farthest",
    seed: int = 0,
    valid: torch.Tensor | None = None,
) -> Clicks:
    """One corrective click per object.

    predicted, target: `B x H x W` bool (the current mask, the wanted one); valid: `B x H x W`
    bool, where clicks may go (the image, not its padding; None: everywhere); seed: offsets
    the noise of `random` mode (non-negative). Coordinates are grid pixels.
    """
    missed = target & ~predicted
    extra = predicted & ~target
    if valid is not None:
        missed, extra = missed & valid, extra & valid
    if mode == "farthest":
        flat, positive = _farthest(missed, extra)
    elif mode == "random":
        flat, positive = _random(missed, extra, seed)
    else:
        raise ValueError(f"click mode must be 'farthest' or 'random', got {mode!r}")
    wrong = (missed | extra).flatten(1).any(dim=1)
    coords = torch.where(wrong[:, None], _pixel_coords(flat, predicted.shape[-1]), 0.0)
    labels = torch.where(wrong, positive.long(), PADDING_LABEL)
    return Clicks(coords, labels)
