"""Prompts for training images without masks (`data.prompts.unlabelled`).

Without masks an image only teaches the encoder, unless it is given prompts whose decoder
outputs the student can match against the teacher's:

- `points`: `N` single positive points on a jittered grid over the image (one point per cell
  of a `ceil(sqrt(N))`-sided grid, cells chosen at random when there are more than `N`);
- `teacher_masks`: the teacher's automatic masks of the image (`samkd extract --pseudo-masks`,
  or generated at the start of an online run) are its objects; prompts are drawn from them
  as from ground truth, and they may serve as targets of SAM's task loss, weighted by
  `train.pseudo_mask_weight` against ground truth's 1 (`gt_then_teacher`: ground truth where
  an image has it, the teacher's masks elsewhere).

Every object carries its task-loss weight: 1 for ground truth, `pseudo_mask_weight` for a
teacher mask, 0 for a grid point, which has no target.

Geometric augmentation (`train.augment.crop_scale`, `scale_jitter`, `rotate90`) comes first:
grid points are drawn on the transformed image, and the teacher's masks of the original image
are turned and cropped like it; an image whose objects a crop left out counts as one without
masks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np
import torch

from samkd.data import Geometry, Sample, SegmentationDataset
from samkd.data.dataset import with_prompts
from samkd.data.masks import masks_to_boxes
from samkd.data.prompts import select_objects
from samkd.features.pseudo_masks import decode_pseudo_masks

UnlabelledMode = Literal["none", "points", "teacher_masks"]
PseudoMaskLookup = Callable[[str], Sequence[dict[str, Any]]]
"""The teacher's automatic masks of an image (by id), as RLE dicts."""


@dataclass(frozen=True)
class LabelFree:
    """How images without masks are prompted (see the module docstring).

    pseudo_masks: looks up an image's teacher masks (`teacher_masks` only); must survive
    pickling into DataLoader workers (a `FeatureStore` method, a dict's `get`).
    """

    mode: UnlabelledMode = "none"
    num_points: int = 8
    pseudo_mask_weight: float = 0.0
    pseudo_masks: PseudoMaskLookup | None = None

    def prompt(
        self,
        sample: Sample,
        dataset: SegmentationDataset,
        rng: np.random.Generator,
        geometry: Geometry | None = None,
    ) -> tuple[Sample, torch.Tensor]:
        """The sample, prompted here when it has no masks, and each object's task-loss
        weight (`N` float32). `geometry`: how the sample's image was turned and cropped
        (`SegmentationDataset.sample`), to bring the teacher's masks of the original image
        into its frame; grid points are drawn on the sample's image as it is."""
        count = len(sample.prompt_kinds)
        if count or self.mode == "none":
            return sample, torch.ones(count)
        if self.mode == "points":
            points = grid_points(sample.input_size, self.num_points, rng)
            return with_point_prompts(sample, points), torch.zeros(len(points))
        masks = self._teacher_masks(sample, dataset, geometry)
        if masks.shape[0] == 0 or dataset.prompt_sampler is None:
            return sample, torch.zeros(0)
        objects = replace(
            sample, masks=torch.from_numpy(masks), boxes=torch.from_numpy(masks_to_boxes(masks))
        )
        prompted = with_prompts(objects, masks, dataset.prompt_sampler, dataset.seed)
        return prompted, torch.full((masks.shape[0],), self.pseudo_mask_weight)

    def _teacher_masks(
        self, sample: Sample, dataset: SegmentationDataset, geometry: Geometry | None
    ) -> np.ndarray:
        """The image's non-empty teacher masks (`N x H x W` bool, in the sample's frame), at
        most `max_objects`."""
        assert self.pseudo_masks is not None
        rles = self.pseudo_masks(sample.image_id)
        if geometry is None:
            masks = decode_pseudo_masks(rles, sample.original_size)
        elif not rles:
            return np.zeros((0, *sample.original_size), dtype=bool)
        else:
            # Stored at the original image's size: `geometry` is relative to it.
            masks = geometry.masks(decode_pseudo_masks(rles))
            if masks.shape[1:] != sample.original_size:
                raise ValueError(f"{sample.image_id}: teacher masks of another image size")
        # An automatic mask may vanish at full size, or outside a crop.
        masks = masks[masks.any(axis=(1, 2))]
        chosen = select_objects(
            len(masks), dataset.max_objects, seed=dataset.seed, index=sample.index
        )
        return masks[chosen]


def grid_points(input_size: tuple[int, int], count: int, rng: np.random.Generator) -> np.ndarray:
    """`count x 2` `(x, y)` points in the input frame: one uniform point in each of `count`
    cells of a `ceil(sqrt(count))`-sided grid over the unpadded image (`input_size` `(h, w)`),
    the cells chosen at random."""
    side = math.ceil(math.sqrt(count))
    cells = np.sort(rng.choice(side * side, size=count, replace=False))
    rows, columns = np.divmod(cells, side)
    height, width = input_size
    offsets = rng.uniform(0.0, 1.0, size=(count, 2))
    x = (columns + offsets[:, 0]) * width / side
    y = (rows + offsets[:, 1]) * height / side
    # Pixel coordinates: the prompt encoder adds the half-pixel offset itself.
    return np.stack([np.minimum(x, width - 1), np.minimum(y, height - 1)], axis=1)


def with_point_prompts(sample: Sample, points: np.ndarray) -> Sample:
    """`sample` with one single-point prompt (positive) per row of `points` (`N x 2`, input
    frame); it keeps its (empty) masks: these objects have no target."""
    count = len(points)
    return replace(
        sample,
        prompt_boxes=torch.zeros(count, 4),
        point_coords=torch.from_numpy(points.astype(np.float32))[:, None],
        point_labels=torch.ones(count, 1, dtype=torch.int64),
        prompt_kinds=tuple("points" for _ in range(count)),
    )
