"""Input frames: how a model's square input holds the image, and mapping between frames.

- `longest_side` (SAM 1, MobileSAM, samkd's training pipeline): the image is resized so that
  its longest side is `S`, keeping its aspect ratio, and padded at the bottom and right; the
  image fills the top-left `h x w` of the input (`input_size`).
- `square` (SAM 2, as it was trained and as `SAM2ImagePredictor` runs it): the whole image is
  resized to `S x S`, its aspect ratio not kept; no padding (`samkd.data.preprocess_square`).

Training and evaluation work in the student's frame (the pipeline frame, `longest_side`). A
model in the `square` frame gets prompts mapped into its frame (`FrameMap.points_to_model`),
and its maps (embedding, mask logits, upscaled embedding) are resampled into the pipeline
frame where they are compared (`FrameMap.to_pipeline`): each pipeline cell whose centre lies
on the image takes the bilinear sample of the model's map at the same image position; cells on
the padding have no counterpart and are marked invalid. Both frames scale coordinates from the
image's top-left corner (`x * S / W` for `square`, `x * s` for `longest_side`), and SAM's
prompt encoders add the half pixel themselves, so a point maps to the same image position.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from samkd.data.images import preprocess_image, preprocess_square

Frame = Literal["longest_side", "square"]
LONGEST_SIDE: Frame = "longest_side"
SQUARE: Frame = "square"
FRAMES: tuple[Frame, ...] = (LONGEST_SIDE, SQUARE)
VALID_SUFFIX = "@valid"


def frame_input(image: np.ndarray, image_size: int, frame: str) -> torch.Tensor:
    """`3 x S x S` input of an `H x W x 3` uint8 image in `frame`."""
    if frame == SQUARE:
        return preprocess_square(image, image_size)
    return preprocess_image(image, image_size)[0]


def valid_key(tap: str) -> str:
    """The key, beside a mapped map's `tap`, of its valid cells (bool, `N x 1 x g x g`):
    those whose centre lies on the image in the pipeline frame."""
    return tap + VALID_SUFFIX


@dataclass(frozen=True)
class FrameMap:
    """The mapping between the pipeline frame and a `square` model's frame for `N` images.

    input_sizes: `(h, w)` of each image inside the pipeline's `S x S` input (before padding),
    `N x 2` (on the maps' device, so that mapping needs no host copy), or one `(h, w)` for all;
    image_size: `S`, the side of both inputs.
    """

    input_sizes: torch.Tensor | tuple[int, int]
    image_size: int

    def points_to_model(self, coords: torch.Tensor) -> torch.Tensor:
        """`N x ... x 2` `(x, y)` pipeline-frame pixel coordinates -> the square frame's."""
        heights, widths = self._sizes(coords.device)
        # In float64 and then rounded, as Python computes a single image's scale.
        scale = torch.cat(
            [self.image_size / widths.double(), self.image_size / heights.double()], 1
        )
        return coords * scale.to(coords.dtype).reshape(len(scale), *[1] * (coords.ndim - 2), 2)

    def boxes_to_model(self, boxes: torch.Tensor) -> torch.Tensor:
        """`N x 4` XYXY boxes -> the square frame's."""
        return self.points_to_model(boxes.reshape(-1, 2, 2)).reshape(-1, 4)

    def to_pipeline(
        self, maps: torch.Tensor, fill: float = 0.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Square-frame maps `N x C x g x g` -> the pipeline frame's `N x C x g x g` and the
        valid cells `N x 1 x g x g` (bool: the cell's centre lies on the image). Invalid cells
        (on the padding) hold `fill`."""
        grid = maps.shape[-1]
        rows, columns = self._pipeline_fractions(grid, maps.device)
        sampled = _sample(maps, rows, columns)
        valid = ((rows < 1)[:, :, None] & (columns < 1)[:, None, :])[:, None]
        valid = valid.expand(len(maps), -1, -1, -1)
        return torch.where(valid, sampled, torch.full_like(sampled, fill)), valid

    def to_model(self, maps: torch.Tensor) -> torch.Tensor:
        """Pipeline-frame maps `N x C x g x g` (e.g. mask logits fed back as mask prompts) ->
        the square frame's: each square cell samples the pipeline map at its image position."""
        grid = maps.shape[-1]
        heights, widths = self._sizes(maps.device)
        centres = (torch.arange(grid, device=maps.device, dtype=torch.float32) + 0.5) / grid
        # A square cell at image fraction f lies at pipeline pixel f * h, of the S-pixel input.
        return _sample(
            maps, centres * heights / self.image_size, centres * widths / self.image_size
        )

    def _sizes(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Heights and widths, `N x 1` each (`1 x 1` for one size for all)."""
        sizes = torch.as_tensor(self.input_sizes, device=device).reshape(-1, 2)
        return sizes[:, :1], sizes[:, 1:]

    def _pipeline_fractions(
        self, grid: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Where each pipeline cell's centre lies as a fraction of each image's height (rows)
        and width (columns), `N x g` each; 1 or more: on the padding."""
        heights, widths = self._sizes(device)
        centres = (torch.arange(grid, device=device, dtype=torch.float32) + 0.5) * (
            self.image_size / grid
        )
        return centres / heights, centres / widths


def _sample(maps: torch.Tensor, rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """Bilinear samples of `maps` (`N x C x g x g`, covering [0, 1] of both axes) at the row
    and column fractions given (`N x g` each, or `1 x g` for all maps), clamped to the border."""
    ys = rows * 2 - 1
    xs = columns * 2 - 1
    grid = torch.stack(torch.broadcast_tensors(xs[:, None, :], ys[:, :, None]), dim=-1)
    grid = grid.expand(maps.shape[0], -1, -1, -1)
    # float32: grid_sample takes no reduced precision on every device.
    return F.grid_sample(
        maps.float(), grid, mode="bilinear", padding_mode="border", align_corners=False
    )
