"""Frozen teachers, built the same way by extraction, online training and evaluation."""

from __future__ import annotations

from os import PathLike

import torch
from loguru import logger
from segment_anything.modeling import MaskDecoder, PromptEncoder, Sam
from torch import nn

from samkd.models.fast_attention import optimize_teacher
from samkd.models.frames import LONGEST_SIDE, Frame
from samkd.models.registry import build_prompt_decoder, build_sam, model_type_info
from samkd.models.sam2_build import require_sam2

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
    frame: Frame | None = None,
) -> Sam:
    """A frozen teacher on `device`: its checkpoint's weights, or seeded random weights (the
    global random state is left as it was). `fast` puts a SAM ViT's image encoder on the fast
    path (`samkd.models.fast_attention`), `compile` also compiling it; SAM 2's Hiera already
    runs scaled-dot-product attention. `frame`: a SAM 2 teacher's input frame (default its
    own, `square`)."""
    if checkpoint is None:
        logger.warning(f"teacher {model_type} has no checkpoint: using seeded random weights")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_TEACHER_SEED)
            model = build_sam(model_type, image_size=image_size)
    else:
        model = build_sam(model_type, image_size=image_size, checkpoint=checkpoint)
    frozen(model.to(device))
    if model_type_info(model_type).sam2 is not None:
        model.frame = frame or model.frame
    elif fast:
        optimize_teacher(model, compile=compile)
    return model


def prompt_decoder_for(model_type: str, image_size: int, frame: Frame | None = None) -> nn.Module:
    """The prompt encoder and mask decoder of `model_type` alone (`PromptDecoder`, or SAM 2's
    `Sam2PromptDecoder`), as a feature file stores them; `frame`: a SAM 2 decoder's."""
    spec = model_type_info(model_type).sam2
    if spec is None:
        return PromptDecoder(image_size)
    require_sam2(model_type)
    from samkd.models.sam2_prompt_decoder import Sam2PromptDecoder

    return Sam2PromptDecoder(spec, image_size, frame or "square")


class PromptDecoder(nn.Module):
    """A teacher's prompt encoder and mask decoder alone (state-dict keys as in `Sam`), as
    stored in feature files."""

    frame: Frame = LONGEST_SIDE

    def __init__(self, image_size: int) -> None:
        super().__init__()
        self.prompt_encoder: PromptEncoder
        self.mask_decoder: MaskDecoder
        self.prompt_encoder, self.mask_decoder = build_prompt_decoder(image_size)
