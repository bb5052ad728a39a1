"""Deterministic evaluation prompts from ground-truth masks (original-image coordinates).

- `box`: the mask's box (inclusive pixel indices, as SAM's `batched_mask_to_box`).
- `point`: one positive point at the interior point farthest from the mask boundary.
- `points-k`: k clicks placed interactively: the first as `point`, each next one at the pixel
  farthest from the boundary of the larger error region of the previous prediction, positive
  for a missed region and negative for a false one (the click protocol of interactive
  segmentation benchmarks).
"""

from __future__ import annotations

import numpy as np
import torch

from samkd.data import distance_transform, farthest_from_boundary_point
from samkd.evaluate.predict import ObjectPrompts


def box_prompts(masks: torch.Tensor) -> ObjectPrompts:
    """XYXY boxes `N x 4` of `N x H x W` boolean masks (none may be empty)."""
    boxes = []
    for mask in masks:
        rows = torch.nonzero(mask.any(dim=1)).flatten()
        cols = torch.nonzero(mask.any(dim=0)).flatten()
        boxes.append([cols[0], rows[0], cols[-1], rows[-1]])
    return ObjectPrompts(boxes=torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))


def center_point_prompts(masks: torch.Tensor) -> ObjectPrompts:
    """One positive point per mask, farthest from its boundary: coords `N x 1 x 2`."""
    points = [farthest_from_boundary_point(mask.numpy()) for mask in masks]
    coords = torch.tensor(points, dtype=torch.float32).reshape(-1, 1, 2)
    return ObjectPrompts(point_coords=coords, point_labels=torch.ones(len(points), 1))


def next_click(predicted: np.ndarray, target: np.ndarray) -> tuple[int, int, int]:
    """`(x, y, label)` of the corrective click for one object.

    The click goes to the pixel farthest from the boundary of the false-negative region
    (label 1) or of the false-positive region (label 0), whichever reaches deeper; a perfect
    prediction gets a positive click at the target's centre point.
    """
    missed = target & ~predicted
    extra = predicted & ~target
    missed_depth = distance_transform(missed).max() if missed.any() else 0.0
    extra_depth = distance_transform(extra).max() if extra.any() else 0.0
    if missed_depth == 0.0 and extra_depth == 0.0:
        x, y = farthest_from_boundary_point(target)
        return x, y, 1
    if missed_depth >= extra_depth:
        x, y = farthest_from_boundary_point(missed)
        return x, y, 1
    x, y = farthest_from_boundary_point(extra)
    return x, y, 0


def add_clicks(
    prompts: ObjectPrompts, predicted: torch.Tensor, targets: torch.Tensor
) -> ObjectPrompts:
    """`prompts` with one more corrective click per object (`N x H x W` masks)."""
    assert prompts.point_coords is not None and prompts.point_labels is not None
    clicks = [
        next_click(mask.numpy(), target.numpy())
        for mask, target in zip(predicted, targets, strict=True)
    ]
    coords = torch.tensor([[x, y] for x, y, _ in clicks], dtype=torch.float32)
    labels = torch.tensor([label for _, _, label in clicks], dtype=torch.float32)
    return ObjectPrompts(
        point_coords=torch.cat([prompts.point_coords, coords[:, None]], dim=1),
        point_labels=torch.cat([prompts.point_labels, labels[:, None]], dim=1),
    )
