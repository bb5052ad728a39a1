"""SAM's ViT image encoder with optional gradient checkpointing over its blocks."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
from segment_anything.modeling import ImageEncoderViT
from torch import nn

from samkd.models.common import forward_blocks


class CheckpointedImageEncoderViT(ImageEncoderViT):
    """segment-anything's `ImageEncoderViT` in SAM's configuration (relative positions, windowed
    blocks with a few global ones), able to recompute block activations in backward.

    Parameters and forward results are those of `ImageEncoderViT`. Positional embeddings are
    sized for `img_size`, so the encoder only runs at that size.
    """

    def __init__(
        self,
        img_size: int,
        patch_size: int,
        embed_dim: int,
        depth: int,
        num_heads: int,
        window_size: int,
        global_attn_indexes: Sequence[int],
        mlp_ratio: float = 4.0,
        out_chans: int = 256,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__(
            img_size=img_size,
            patch_size=patch_size,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            out_chans=out_chans,
            qkv_bias=True,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            use_rel_pos=True,
            window_size=window_size,
            global_attn_indexes=tuple(global_attn_indexes),
        )
        self.gradient_checkpointing = gradient_checkpointing

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute each block's activations in backward instead of storing them."""
        self.gradient_checkpointing = enabled

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images B x 3 x img_size x img_size -> B x out_chans x img_size/16 x img_size/16."""
        x = self.patch_embed(x)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        x = forward_blocks(self.blocks, x, self.gradient_checkpointing)
        return self.neck(x.permute(0, 3, 1, 2))
