"""A SAM 2 model (sam2's `SAM2Base`) presented as samkd's pipeline uses a SAM model.

samkd's extraction, training and evaluation call a model's `image_encoder(images)` for the
image embedding and its `prompt_encoder` and `mask_decoder`. `Sam2Model` is sam2's own
`SAM2Base`, built from sam2's Hydra configs (`samkd.models.sam2_build`), with:

- `image_encoder`: a `Sam2ImageEncoder`, returning `image_embed` (with `no_mem_embed`) and
  computing the two high-resolution maps on the way (`encode`);
- `prompt_encoder`, `mask_decoder`: SAM 2's `sam_prompt_encoder` and `sam_mask_decoder`;
- `frame`: the input frame it runs in (`samkd.models.frames`; `square` as SAM 2 was trained).

Its state dict is `SAM2Base`'s, key for key, so official checkpoints (`{"model": ...}`) load
strictly and samkd's weights load back into sam2's model. Memory attention, the memory encoder
and the object-pointer heads are built (they are in the checkpoints) but never run on single
images (`samkd.models.registry.SAM2_UNUSED_PREFIXES`).

Decoding follows `SAM2ImagePredictor`: box corners are points labelled 2 and 3 before the
clicks, with a padding point; the mask decoder takes the high-resolution maps; with one mask
asked for, an unstable single-mask output falls back to the best multimask one
(`dynamic_multimask_via_stability`, as `build_sam2` sets it); the object score is computed but
not applied to the masks (neither does the predictor).
"""

from __future__ import annotations

from typing import Any

import torch
from sam2.modeling.sam2_base import SAM2Base
from torch import nn

from samkd.models.frames import SQUARE, Frame
from samkd.models.sam2_image_encoder import Sam2ImageEncoder

FAMILY = "sam2"


class Sam2Model(SAM2Base):
    """sam2's `SAM2Base` with samkd's view of its parts (see the module docstring)."""

    family = FAMILY
    mask_threshold = 0.0

    def __init__(self, image_encoder: nn.Module, **kwargs: Any) -> None:
        super().__init__(image_encoder, **kwargs)
        if not isinstance(self.image_encoder, Sam2ImageEncoder):
            raise TypeError("Sam2Model needs a Sam2ImageEncoder (see samkd.models.sam2_build)")
        self.image_encoder.bind(self, self.image_size)
        self.frame: Frame = SQUARE

    @property
    def prompt_encoder(self) -> nn.Module:
        """SAM 2's prompt encoder (`sam_prompt_encoder`)."""
        module: nn.Module = self.sam_prompt_encoder
        return module

    @property
    def mask_decoder(self) -> nn.Module:
        """SAM 2's mask decoder (`sam_mask_decoder`), with `conv_s0` and `conv_s1`."""
        module: nn.Module = self.sam_mask_decoder
        return module

    def forward_image(self, img_batch: torch.Tensor) -> dict[str, Any]:
        """`SAM2Base.forward_image` (what `SAM2ImagePredictor.set_image` calls)."""
        output = self.image_encoder.backbone(img_batch)
        levels = output["backbone_fpn"]
        levels[0] = self.sam_mask_decoder.conv_s0(levels[0])
        levels[1] = self.sam_mask_decoder.conv_s1(levels[1])
        return output
