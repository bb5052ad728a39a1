"""SAM 2's image encoder (Hiera trunk + FPN neck) as samkd's pipeline calls an image encoder.

`Sam2ImageEncoder(images)` returns the image embedding `B x 256 x S/16 x S/16` that SAM 2's
mask decoder takes: the neck's stride-16 level plus `no_mem_embed`, exactly what
`SAM2ImagePredictor.set_image` stores as `image_embed`. On the way it runs the mask decoder's
`conv_s0` and `conv_s1` on the stride-4 and stride-8 levels, giving the two high-resolution maps
the decoder also takes (`B x 32 x S/4 x S/4`, `B x 64 x S/8 x S/8`; the predictor's
`high_res_feats`), returned by `encode` and tapped as `encoder.high_res.0/1`.

It is the `image_encoder` of `Sam2Model`, with the trunk and neck of sam2's `ImageEncoder`
under their own names, so that state dicts keep the official layout; `conv_s0`, `conv_s1` and
`no_mem_embed` belong to the model (`bind`), not to it.
"""

from __future__ import annotations

from typing import Any

import torch
from sam2.modeling.backbones.image_encoder import ImageEncoder
from torch import nn


class Sam2ImageEncoder(ImageEncoder):
    """sam2's `ImageEncoder` returning the decoder's image embedding (see the module)."""

    def __init__(self, trunk: nn.Module, neck: nn.Module, scalp: int = 0) -> None:
        super().__init__(trunk, neck, scalp)
        self.img_size = 0  # set by `bind`: the model's input side

    def bind(self, owner: Any, image_size: int) -> None:
        """Take the high-resolution projections and `no_mem_embed` from `owner` (a
        `Sam2Model`) at call time, without registering them here (they keep their keys)."""
        object.__setattr__(self, "_owner", owner)
        self.img_size = image_size

    def backbone(self, images: torch.Tensor) -> dict[str, Any]:
        """sam2's `ImageEncoder.forward`: `backbone_fpn` (strides 4, 8, 16), positions."""
        output: dict[str, Any] = super().forward(images)
        return output

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """`B x 3 x S x S` -> the image embedding `B x 256 x S/16 x S/16` and the two
        high-resolution maps `(B x 32 x S/4 x S/4, B x 64 x S/8 x S/8)`."""
        owner = self.__dict__["_owner"]
        levels = self.backbone(images)["backbone_fpn"]
        decoder = owner.sam_mask_decoder
        high_res = (decoder.conv_s0(levels[0]), decoder.conv_s1(levels[1]))
        # SAM2ImagePredictor adds no_mem_embed (1 x 1 x C) to the flattened HW x B x C level.
        embedding = levels[2] + owner.no_mem_embed.reshape(1, -1, 1, 1)
        return embedding, high_res

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """`B x 3 x S x S` -> the image embedding `B x 256 x S/16 x S/16`."""
        return self.encode(images)[0]
