"""Pieces shared by the image encoders."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def forward_blocks(
    blocks: Iterable[nn.Module], x: torch.Tensor, checkpointed: bool
) -> torch.Tensor:
    """Runs `blocks` in order, recomputing each one's activations in backward if `checkpointed`.

    Non-reentrant checkpointing keeps intermediate outputs (for example tapped ones) in the
    autograd graph, so losses on them still reach the parameters.
    """
    for block in blocks:
        if checkpointed and torch.is_grad_enabled():
            x = checkpoint(block, x, use_reentrant=False)
        else:
            x = block(x)
    return x
