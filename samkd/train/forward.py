"""The student's and teachers' forward passes for one training batch.

`Sam.forward` runs under `no_grad`, so training calls the image encoder, prompt encoder and
mask decoder itself. Objects of one image are decoded together, split by prompt kind (boxes
or points), as SAM's prompt encoder takes one kind per call.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from segment_anything.modeling import MaskDecoder, PromptEncoder, Sam
from torch import nn

from samkd.models import DECODER_MASK_LOGITS, DECODER_UPSCALED, ENCODER_EMBED, capture_taps
from samkd.models.frames import valid_key
from samkd.models.sam2_decoding import predict_all_masks
from samkd.models.taps import ENCODER_HIGH_RES, is_sam2, upscaling_output
from samkd.train.batches import TrainingBatch


@dataclass(frozen=True)
class PromptGroup:
    """Prompts of some objects of one image, all of one kind, in the input frame.

    boxes: `n x 4`, or point_coords `n x K x 2` with point_labels `n x K`;
    objects: `n` indices into the image's objects (on the training device, so that indexing
    device tensors with them needs no host-to-device copy); input_size: the image's `(h, w)`
    before padding; mask_inputs: `n x 1 x 4h x 4w` low-resolution logits given as mask prompts
    where `mask_feedback` (`n` bool) is set (the prompt loop's later iterations);
    task_weights: `n` weights of the objects in SAM's task loss (None: all 1; 0: no target).
    """

    sample: int
    objects: torch.Tensor
    boxes: torch.Tensor | None = None
    point_coords: torch.Tensor | None = None
    point_labels: torch.Tensor | None = None
    input_size: tuple[int, int] | None = None
    mask_inputs: torch.Tensor | None = None
    mask_feedback: torch.Tensor | None = None
    task_weights: torch.Tensor | None = None

    def ambiguous(self) -> torch.Tensor:
        """`n` bool, on the prompts' device: objects prompted by one point alone, for which SAM
        uses its multimask outputs (one point may mean a part, an object or a group)."""
        if self.point_labels is None or self.boxes is not None:
            return torch.zeros(len(self.objects), dtype=torch.bool, device=self.objects.device)
        return (self.point_labels >= 0).sum(dim=1) == 1


@dataclass(frozen=True)
class DecoderOutputs:
    """For every prompted object of a batch, in group order: all four of SAM's outputs,
    `mask_logits` N x 4 x 4h x 4w and `iou` N x 4 (output 0 is the single-mask output,
    1-3 the multimask ones), `ambiguous` N bool (a single point: the multimask outputs are
    the ones to use), `upscaled` N x 32 x 4h x 4w (when recorded); `valid` N x 1 x 4h x 4w
    bool for outputs mapped from another frame (`samkd.train.frames`), else None."""

    mask_logits: torch.Tensor
    iou: torch.Tensor
    ambiguous: torch.Tensor
    upscaled: torch.Tensor | None
    valid: torch.Tensor | None = None


def prompt_groups(batch: TrainingBatch, device: torch.device) -> list[PromptGroup]:
    """Box objects and point objects of each image, as separate groups.

    The prompts are small host tensors; they are copied with `non_blocking=True`, as a
    blocking host-to-device copy waits for all the work queued on the device.
    """

    def to_device(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(device, non_blocking=True)

    groups = []
    for position, item in enumerate(batch.samples):
        sample = item.sample
        boxed = [i for i, kind in enumerate(sample.prompt_kinds) if kind == "box"]
        pointed = [i for i, kind in enumerate(sample.prompt_kinds) if kind == "points"]
        size = sample.input_size
        weights = item.task_weights
        if boxed and sample.prompt_boxes is not None:
            index = torch.tensor(boxed)
            groups.append(
                PromptGroup(
                    position,
                    to_device(index),
                    boxes=to_device(sample.prompt_boxes[index]),
                    input_size=size,
                    task_weights=None if weights is None else weights[to_device(index)],
                )
            )
        if pointed and sample.point_coords is not None and sample.point_labels is not None:
            index = torch.tensor(pointed)
            groups.append(
                PromptGroup(
                    position,
                    to_device(index),
                    point_coords=to_device(sample.point_coords[index]),
                    point_labels=to_device(sample.point_labels[index]),
                    input_size=size,
                    task_weights=None if weights is None else weights[to_device(index)],
                )
            )
    return groups


def group_targets(batch: TrainingBatch, groups: Sequence[PromptGroup]) -> torch.Tensor:
    """Low-resolution ground truth `N x 4h x 4w` in the order of `groups`' objects."""
    return torch.cat(
        [batch.samples[group.sample].low_res_targets[group.objects] for group in groups]
    )


def group_task_weights(groups: Sequence[PromptGroup]) -> torch.Tensor | None:
    """`N` task-loss weights in the order of `groups`' objects; None when every object weighs 1
    (ground truth only)."""
    if all(group.task_weights is None for group in groups):
        return None
    return torch.cat(
        [
            torch.ones(len(group.objects), device=group.objects.device)
            if group.task_weights is None
            else group.task_weights
            for group in groups
        ]
    )


def embed_points(
    prompt_encoder: PromptEncoder, coords: torch.Tensor, labels: torch.Tensor, pad: bool
) -> torch.Tensor:
    """SAM's point embeddings, `n x K x C` (`K + 1` points with `pad`), equal to
    `PromptEncoder._embed_points`, which selects the points of each label by boolean-mask
    indexing: that counts the mask on the host, a host-device sync for every label. Here
    `torch.where` selects them on the device.

    coords: `n x K x 2` in the input frame; labels: `n x K` (1 foreground, 0 background,
    -1 padding; SAM 2 also gives box corners as points, 2 top-left and 3 bottom-right).
    """
    coords = coords + 0.5  # the centre of the pixel
    if pad:
        coords = torch.cat([coords, coords.new_zeros(coords.shape[0], 1, 2)], dim=1)
        labels = torch.cat([labels, -labels.new_ones(labels.shape[0], 1)], dim=1)
    embedding = prompt_encoder.pe_layer.forward_with_coords(coords, prompt_encoder.input_image_size)
    label = labels[..., None]
    weights = prompt_encoder.point_embeddings
    embedding = embedding + torch.where(label == 0, weights[0].weight, 0.0)
    embedding = embedding + torch.where(label == 1, weights[1].weight, 0.0)
    embedding = embedding + torch.where(label == 2, weights[2].weight, 0.0)
    embedding = embedding + torch.where(label == 3, weights[3].weight, 0.0)
    return torch.where(label == -1, prompt_encoder.not_a_point_embed.weight, embedding)


def encode_prompts(
    prompt_encoder: PromptEncoder, group: PromptGroup, boxes_as_points: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """`PromptEncoder.forward`, free of host-device syncs: sparse embeddings `n x T x C`
    (points, then box corners) and dense ones `n x C x h x w` (the mask prompt's where the
    group feeds one back, else SAM's "no mask" embedding). `boxes_as_points`: as
    `SAM2ImagePredictor` prompts SAM 2, the box corners as points labelled 2 and 3, then the
    clicks, then a padding point."""
    sparse = []
    if boxes_as_points:
        sparse.append(embed_points(prompt_encoder, *_points_with_box(group), pad=True))
    elif group.point_coords is not None and group.point_labels is not None:
        pad = group.boxes is None
        sparse.append(embed_points(prompt_encoder, group.point_coords, group.point_labels, pad))
    if group.boxes is not None and not boxes_as_points:
        sparse.append(prompt_encoder._embed_boxes(group.boxes))
    dense = prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
    height, width = prompt_encoder.image_embedding_size
    dense = dense.expand(len(group.objects), -1, height, width)
    if group.mask_inputs is not None and group.mask_feedback is not None:
        masks = prompt_encoder.mask_downscaling(group.mask_inputs)
        dense = torch.where(group.mask_feedback[:, None, None, None], masks, dense)
    return torch.cat(sparse, dim=1), dense


def _points_with_box(group: PromptGroup) -> tuple[torch.Tensor, torch.Tensor]:
    """`n x K x 2` coordinates and `n x K` labels: the box's corners (labels 2, 3), then the
    group's points."""
    coords, labels = [], []
    if group.boxes is not None:
        corners = group.boxes.reshape(-1, 2, 2)
        coords.append(corners)
        labels.append(torch.tensor([2, 3], device=corners.device).expand(len(corners), 2))
    if group.point_coords is not None and group.point_labels is not None:
        coords.append(group.point_coords.to(dtype=torch.float32))
        labels.append(group.point_labels.long())
    return torch.cat(coords, dim=1), torch.cat(labels, dim=1)


@contextmanager
def recorded_upscaling(mask_decoder: MaskDecoder, enabled: bool) -> Iterator[list[torch.Tensor]]:
    """Collect the decoder's upscaled embeddings (`n x 32 x 4h x 4w`) of every call."""
    outputs: list[torch.Tensor] = []
    if not enabled:
        yield outputs
        return

    def hook(_module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
        outputs.append(output)

    handle = upscaling_output(mask_decoder).register_forward_hook(hook)
    try:
        yield outputs
    finally:
        handle.remove()


def run_decoder(
    prompt_encoder: PromptEncoder,
    mask_decoder: MaskDecoder,
    embeddings: torch.Tensor,
    groups: Sequence[PromptGroup],
    record_upscaled: bool,
    high_res: Sequence[torch.Tensor] | None = None,
) -> DecoderOutputs:
    """Decode every group against its image's embedding (`B x 256 x h x w`), keeping all four
    mask outputs so that training can use the single-mask or the multimask ones per object.

    high_res: a SAM 2 decoder's two high-resolution maps of the batch (`encoder.high_res.0/1`,
    see `samkd.models.sam2_decoding`); None for SAM's."""
    dense_pe = prompt_encoder.get_dense_pe()
    logits, scores = [], []
    with recorded_upscaling(mask_decoder, record_upscaled) as upscaled:
        for group in groups:
            sparse, dense = encode_prompts(prompt_encoder, group, high_res is not None)
            image = embeddings[group.sample : group.sample + 1]
            if high_res is None:
                group_logits, group_scores = mask_decoder.predict_masks(
                    image_embeddings=image,
                    image_pe=dense_pe,
                    sparse_prompt_embeddings=sparse,
                    dense_prompt_embeddings=dense,
                )
            else:
                maps = [level[group.sample : group.sample + 1] for level in high_res]
                group_logits, group_scores = predict_all_masks(
                    mask_decoder, image, dense_pe, sparse, dense, maps
                )
            logits.append(group_logits)
            scores.append(group_scores)
    return DecoderOutputs(
        torch.cat(logits),
        torch.cat(scores),
        torch.cat([group.ambiguous() for group in groups]),
        torch.cat(upscaled) if record_upscaled else None,
    )


def encoder_forward(
    model: Sam, images: torch.Tensor, taps: Sequence[str]
) -> tuple[torch.Tensor, dict[str, object]]:
    """Image embeddings `B x 256 x h x w` and the requested encoder taps (with a SAM 2 model's
    high-resolution maps, which its decoder takes, always)."""
    encoder_taps = [tap for tap in taps if tap.startswith("encoder.") and tap != ENCODER_EMBED]
    if is_sam2(model):
        encoder_taps = list(dict.fromkeys([*encoder_taps, *ENCODER_HIGH_RES]))
    with capture_taps(model, encoder_taps) as captured:
        embeddings = model.image_encoder(images)
        features: dict[str, object] = dict(captured)
    features[ENCODER_EMBED] = embeddings
    return embeddings, features


def high_res_of(features: Mapping[str, object]) -> tuple[torch.Tensor, ...] | None:
    """A SAM 2 model's two high-resolution maps among its encoder `features`, else None."""
    maps = [features.get(name) for name in ENCODER_HIGH_RES]
    if not all(isinstance(level, torch.Tensor) for level in maps):
        return None
    return tuple(level for level in maps if isinstance(level, torch.Tensor))


def decoder_features(outputs: DecoderOutputs, taps: Sequence[str]) -> dict[str, torch.Tensor]:
    """The decoder taps among `taps`, from a decoder run (with their valid cells, for outputs
    mapped from another frame)."""
    features: dict[str, torch.Tensor] = {}
    if DECODER_UPSCALED in taps and outputs.upscaled is not None:
        features[DECODER_UPSCALED] = outputs.upscaled
    if DECODER_MASK_LOGITS in taps:
        features[DECODER_MASK_LOGITS] = outputs.mask_logits
    if outputs.valid is not None:
        features.update({valid_key(tap): outputs.valid for tap in list(features)})
    return features
