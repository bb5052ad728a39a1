"""Frozen teachers, built the same way by extraction, online training and evaluation."""

from __future__ import annotations

from os import PathLike

import torch
from loguru import logger
from segment_anything.modeling import MaskDecoder, PromptEncoder, Sam
from torch import nn

from samkd.models.fast_attention import optimize_teacher
from samkd.models.registry import build_prompt_decoder, build_sam

# A teacher without a checkpoint gets random weights from this seed, drawn on the CPU: every
# job, rank and rerun then sees the same teacher, so stored and online features agree.
RANDOM_TEACHER_SEED = 0


def frozen(module: nn.Module) -> nn.Module:
    """`module` in eval mode with every parameter frozen."""
    module.eval()
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    return module


def build_teacher(
    model_type: str,
    image_size: int,
    checkpoint: str | PathLike[str] | None,
    device: torch.device,
    *,
    fast: bool = False,
    compile: bool = False,
) -> Sam:
    """A frozen teacher on `device`: its checkpoint's weights, or seeded random weights (the
    global random state is left as it was). `fast` puts its image encoder on the fast path
    (`samkd.models.fast_attention`), `compile` also compiling it."""
    if checkpoint is None:
        logger.warning(f"teacher {model_type} has no checkpoint: using seeded random weights")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_TEACHER_SEED)
            model = build_sam(model_type, image_size=image_size)
    else:
        model = build_sam(model_type, image_size=image_size, checkpoint=checkpoint)
    frozen(model.to(device))
    if fast:
        optimize_teacher(model, compile=compile)
    return model


class PromptDecoder(nn.Module):
    """A teacher's prompt encoder and mask decoder alone (state-dict keys as in `Sam`), as
    stored in feature files."""

    def __init__(self, image_size: int) -> None:
        super().__init__()
        self.prompt_encoder: PromptEncoder
        self.mask_decoder: MaskDecoder
        self.prompt_encoder, self.mask_decoder = build_prompt_decoder(image_size)
