"""A SAM 2 teacher's prompt encoder and mask decoder alone, as stored in feature files.

The parts `SAM2Base` builds in `_build_sam_heads`, with the options of the model type's config
(`samkd.models.sam2_build.compose_config`), under the model's own names (`sam_prompt_encoder`,
`sam_mask_decoder`), so that a teacher's decoder state dict loads strictly. Like `Sam2Model`,
it presents them as `prompt_encoder` and `mask_decoder`.
"""

from __future__ import annotations

import torch
from sam2.modeling.sam.mask_decoder import MaskDecoder
from sam2.modeling.sam.prompt_encoder import PromptEncoder
from sam2.modeling.sam.transformer import TwoWayTransformer
from torch import nn

from samkd.models.frames import SQUARE, Frame
from samkd.models.sam2_build import Sam2Config, compose_config
from samkd.models.sam2_model import FAMILY

EMBED_DIM = 256


class Sam2PromptDecoder(nn.Module):
    """SAM 2's `sam_prompt_encoder` and `sam_mask_decoder` of a model type at `image_size`."""

    family = FAMILY

    def __init__(self, spec: Sam2Config, image_size: int, frame: Frame = SQUARE) -> None:
        super().__init__()
        model = compose_config(spec, image_size).model
        grid = image_size // model.get("backbone_stride", 16)
        self.sam_prompt_encoder = PromptEncoder(
            embed_dim=EMBED_DIM,
            image_embedding_size=(grid, grid),
            input_image_size=(image_size, image_size),
            mask_in_chans=16,
        )
        self.sam_mask_decoder = MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=2, embedding_dim=EMBED_DIM, mlp_dim=2048, num_heads=8
            ),
            transformer_dim=EMBED_DIM,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
            use_high_res_features=model.use_high_res_features_in_sam,
            iou_prediction_use_sigmoid=model.iou_prediction_use_sigmoid,
            pred_obj_scores=model.pred_obj_scores,
            pred_obj_scores_mlp=model.pred_obj_scores_mlp,
            use_multimask_token_for_obj_ptr=model.use_multimask_token_for_obj_ptr,
            **(model.sam_mask_decoder_extra_args or {}),
        )
        self.image_size = image_size
        self.frame = frame

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def prompt_encoder(self) -> nn.Module:
        return self.sam_prompt_encoder

    @property
    def mask_decoder(self) -> nn.Module:
        return self.sam_mask_decoder
