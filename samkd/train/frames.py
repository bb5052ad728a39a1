"""Models in another frame than the pipeline's: prompts mapped in, outputs mapped out.

Training works in the student's frame (`longest_side`: samples, prompts, targets, clicks). A
model in the `square` frame (SAM 2, `samkd.models.frames`) is given its own input (the image
resized to `S x S`), decodes the pipeline's prompts mapped into its frame, and its mask
logits, upscaled embeddings and encoder maps are resampled into the pipeline frame where
they are compared. Pipeline cells on the padding have no counterpart: their mapped values
are a fill (`NO_MASK_LOGIT` for logits, 0 for features), and a `valid` mask
(`samkd.models.frames.valid_key`) tells the distillation terms to leave them out (the
student's own value stands in for the teacher's there, so they add nothing).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from samkd.models.frames import LONGEST_SIDE, Frame, FrameMap, valid_key
from samkd.models.taps import ENCODER_HIGH_RES
from samkd.train.forward import DecoderOutputs, PromptGroup, run_decoder

# The logit a mapped mask holds on the padding: background, as SAM 2's predictor clamps.
NO_MASK_LOGIT = -32.0


def model_group(group: PromptGroup, image_size: int) -> PromptGroup:
    """`group`'s prompts (and fed-back mask logits) in a square model's frame."""
    frame = frame_of(group, image_size)
    return dataclasses.replace(
        group,
        boxes=None if group.boxes is None else frame.boxes_to_model(group.boxes),
        point_coords=(
            None if group.point_coords is None else frame.points_to_model(group.point_coords)
        ),
        mask_inputs=None if group.mask_inputs is None else frame.to_model(group.mask_inputs),
        input_sizes=None,
    )


def frame_of(group: PromptGroup, image_size: int) -> FrameMap:
    """The frames of `group`'s objects' images (the whole input where sizes are not given)."""
    sizes = (image_size, image_size) if group.input_sizes is None else group.input_sizes
    return FrameMap(sizes, image_size)


def outputs_to_pipeline(
    outputs: DecoderOutputs, groups: Sequence[PromptGroup], image_size: int
) -> DecoderOutputs:
    """A square model's decoder outputs (of `groups`, in order) in the pipeline frame, with
    their valid cells (`N x 1 x 4h x 4w`)."""
    sizes = [len(group.objects) for group in groups]
    logits, upscaled, valid = [], [], []
    parts = zip(
        groups,
        outputs.mask_logits.split(sizes),
        outputs.upscaled.split(sizes) if outputs.upscaled is not None else [None] * len(sizes),
        strict=True,
    )
    for group, group_logits, group_upscaled in parts:
        frame = frame_of(group, image_size)
        mapped, cells = frame.to_pipeline(group_logits, NO_MASK_LOGIT)
        logits.append(mapped.to(group_logits.dtype))
        valid.append(cells)
        if group_upscaled is not None:
            upscaled.append(frame.to_pipeline(group_upscaled)[0].to(group_upscaled.dtype))
    return dataclasses.replace(
        outputs,
        mask_logits=torch.cat(logits),
        upscaled=torch.cat(upscaled) if outputs.upscaled is not None else None,
        valid=torch.cat(valid),
    )


def decode_in_frame(
    prompt_encoder: nn.Module,
    mask_decoder: nn.Module,
    embeddings: torch.Tensor,
    groups: Sequence[PromptGroup],
    record_upscaled: bool,
    high_res: Sequence[torch.Tensor] | None = None,
    frame: Frame = LONGEST_SIDE,
) -> DecoderOutputs:
    """`run_decoder` for a model in `frame`, on its own embeddings (and a SAM 2 model's
    high-resolution maps), for prompts given in the pipeline frame; outputs in that frame."""
    if frame == LONGEST_SIDE:
        return run_decoder(
            prompt_encoder, mask_decoder, embeddings, groups, record_upscaled, high_res
        )
    image_size = int(prompt_encoder.input_image_size[0])  # type: ignore[index]
    mapped = [model_group(group, image_size) for group in groups]
    outputs = run_decoder(
        prompt_encoder, mask_decoder, embeddings, mapped, record_upscaled, high_res
    )
    return outputs_to_pipeline(outputs, groups, image_size)


def encoder_to_pipeline(
    features: Mapping[str, object],
    taps: Sequence[str],
    input_sizes: Sequence[tuple[int, int]],
    image_size: int,
) -> dict[str, object]:
    """A square model's encoder maps among `taps` (`B x C x g x g` each), in the pipeline
    frame of each image (`input_sizes`), with their valid cells (`B x 1 x g x g`). The
    high-resolution maps only feed its own decoder: they are left out."""
    mapped: dict[str, object] = {}
    for tap in taps:
        value = features[tap]
        if tap in ENCODER_HIGH_RES or not isinstance(value, torch.Tensor) or value.ndim != 4:
            continue
        one, valid = FrameMap(torch.tensor(input_sizes), image_size).to_pipeline(value)
        mapped[tap] = one.to(value.dtype)
        mapped[valid_key(tap)] = valid
    return mapped
