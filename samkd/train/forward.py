"""The student's and teachers' forward passes for one training batch.

`Sam.forward` runs under `no_grad`, so training calls the image encoder, prompt encoder and
mask decoder itself. The objects of a batch are decoded together, in one call per prompt kind
(boxes, or points with one number of points), as SAM's prompt encoder takes one kind per call.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from segment_anything.modeling import MaskDecoder, PromptEncoder, Sam
from torch import nn

from samkd.models import DECODER_MASK_LOGITS, DECODER_UPSCALED, ENCODER_EMBED, capture_taps
from samkd.train.batches import TrainingBatch


@dataclass(frozen=True)
class PromptGroup:
    """Prompts of one kind (boxes, or points with one number of points) of objects of a
    batch's images, in the input frame, decoded in one call.

    images: `n` index of each object's image in the batch; objects: `n` index of each object
    among the batch's objects, all images' in order (both on the training device, so that
    indexing device tensors with them needs no host-to-device copy); boxes: `n x 4`, or
    point_coords `n x K x 2` with point_labels `n x K`; input_sizes: `n x 2` each object's
    image `(h, w)` before padding (None: the whole input); mask_inputs: `n x 1 x 4h x 4w`
    low-resolution logits given as mask prompts where `mask_feedback` (`n` bool) is set (the
    prompt loop's later iterations); task_weights: `n` weights of the objects in SAM's task
    loss (None: all 1; 0: no target).
    """

    images: torch.Tensor
    objects: torch.Tensor
    boxes: torch.Tensor | None = None
    point_coords: torch.Tensor | None = None
    point_labels: torch.Tensor | None = None
    input_sizes: torch.Tensor | None = None
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
    the ones to use), `upscaled` N x 32 x 4h x 4w (when recorded)."""

    mask_logits: torch.Tensor
    iou: torch.Tensor
    ambiguous: torch.Tensor
    upscaled: torch.Tensor | None


def prompt_groups(batch: TrainingBatch, device: torch.device) -> list[PromptGroup]:
    """The batch's prompted objects, one group per prompt kind (boxes, then points by their
    number), each holding that kind's objects of every image, in image order.

    The prompts are small host tensors; they are copied with `non_blocking=True`, as a
    blocking host-to-device copy waits for all the work queued on the device.
    """
    members: dict[tuple[str, int], list[tuple[int, int, int]]] = {}
    first = 0  # the batch-wide index of the image's first object
    for image, item in enumerate(batch.samples):
        sample = item.sample
        for index, kind in enumerate(sample.prompt_kinds):
            if kind == "box" and sample.prompt_boxes is not None:
                key = ("box", 0)
            elif kind == "points" and sample.point_coords is not None:
                key = ("points", sample.point_coords.shape[1])
            else:
                continue
            members.setdefault(key, []).append((image, index, first + index))
        first += len(sample.prompt_kinds)
    weights = _batch_task_weights(batch, device)
    return [
        _group(batch, kind, members[(kind, count)], weights, device)
        for kind, count in sorted(members)
    ]


def _batch_task_weights(batch: TrainingBatch, device: torch.device) -> torch.Tensor | None:
    """The task weight of every object of the batch, in order; None when all weigh 1."""
    if all(item.task_weights is None for item in batch.samples):
        return None
    return torch.cat(
        [
            torch.ones(len(item.sample.prompt_kinds), device=device)
            if item.task_weights is None
            else item.task_weights.to(device, non_blocking=True)
            for item in batch.samples
        ]
    )


def _group(
    batch: TrainingBatch,
    kind: str,
    members: list[tuple[int, int, int]],
    weights: torch.Tensor | None,
    device: torch.device,
) -> PromptGroup:
    def to_device(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(device, non_blocking=True)

    def gathered(name: str) -> torch.Tensor:
        return torch.stack(
            [getattr(batch.samples[image].sample, name)[index] for image, index, _ in members]
        )

    images = to_device(torch.tensor([image for image, _, _ in members]))
    objects = to_device(torch.tensor([position for _, _, position in members]))
    sizes = torch.tensor([batch.samples[image].sample.input_size for image, _, _ in members])
    prompts = (
        {"boxes": to_device(gathered("prompt_boxes"))}
        if kind == "box"
        else {
            "point_coords": to_device(gathered("point_coords")),
            "point_labels": to_device(gathered("point_labels")),
        }
    )
    return PromptGroup(
        images,
        objects,
        input_sizes=to_device(sizes),
        task_weights=None if weights is None else weights[objects],
        **prompts,
    )


def group_targets(batch: TrainingBatch, groups: Sequence[PromptGroup]) -> torch.Tensor:
    """Low-resolution ground truth `N x 4h x 4w` in the order of `groups`' objects."""
    targets = torch.cat([item.low_res_targets for item in batch.samples])
    return torch.cat([targets[group.objects] for group in groups])


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
    -1 padding).
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
    return torch.where(label == -1, prompt_encoder.not_a_point_embed.weight, embedding)


def encode_prompts(
    prompt_encoder: PromptEncoder, group: PromptGroup
) -> tuple[torch.Tensor, torch.Tensor]:
    """`PromptEncoder.forward`, free of host-device syncs: sparse embeddings `n x T x C`
    (points, then box corners) and dense ones `n x C x h x w` (the mask prompt's where the
    group feeds one back, else SAM's "no mask" embedding)."""
    sparse = []
    if group.point_coords is not None and group.point_labels is not None:
        pad = group.boxes is None
        sparse.append(embed_points(prompt_encoder, group.point_coords, group.point_labels, pad))
    if group.boxes is not None:
        sparse.append(prompt_encoder._embed_boxes(group.boxes))
    dense = prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
    height, width = prompt_encoder.image_embedding_size
    dense = dense.expand(len(group.objects), -1, height, width)
    if group.mask_inputs is not None and group.mask_feedback is not None:
        masks = prompt_encoder.mask_downscaling(group.mask_inputs)
        dense = torch.where(group.mask_feedback[:, None, None, None], masks, dense)
    return torch.cat(sparse, dim=1), dense


@contextmanager
def recorded_upscaling(mask_decoder: MaskDecoder, enabled: bool) -> Iterator[list[torch.Tensor]]:
    """Collect the decoder's upscaled embeddings (`n x 32 x 4h x 4w`) of every call."""
    outputs: list[torch.Tensor] = []
    if not enabled:
        yield outputs
        return

    def hook(_module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
        outputs.append(output)

    handle = mask_decoder.output_upscaling.register_forward_hook(hook)
    try:
        yield outputs
    finally:
        handle.remove()


def predict_masks(
    mask_decoder: MaskDecoder,
    image_embeddings: torch.Tensor,
    image_pe: torch.Tensor,
    sparse_prompt_embeddings: torch.Tensor,
    dense_prompt_embeddings: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`MaskDecoder.predict_masks` with each prompt's own image embedding: all four masks
    `n x 4 x 4h x 4w` and IoU predictions `n x 4`.

    image_embeddings: `n x C x h x w`, the embedding of each prompt's image; image_pe:
    `1 x C x h x w`; sparse: `n x T x C`; dense: `n x C x h x w`. segment-anything's repeats one
    image's embedding for every prompt, so each image takes a call of its own; here the prompts
    of a whole batch decode in one call, with the same operations in the same order.
    """
    count = sparse_prompt_embeddings.shape[0]
    output_tokens = torch.cat([mask_decoder.iou_token.weight, mask_decoder.mask_tokens.weight])
    tokens = torch.cat([output_tokens.expand(count, -1, -1), sparse_prompt_embeddings], dim=1)
    src = image_embeddings + dense_prompt_embeddings
    positions = image_pe.expand(count, -1, -1, -1)
    batch, channels, height, width = src.shape
    hidden, src = mask_decoder.transformer(src, positions, tokens)
    iou_token = hidden[:, 0, :]
    mask_tokens = hidden[:, 1 : 1 + mask_decoder.num_mask_tokens, :]
    src = src.transpose(1, 2).view(batch, channels, height, width)
    upscaled = mask_decoder.output_upscaling(src)
    heads = mask_decoder.output_hypernetworks_mlps
    hyper_in = torch.stack([head(mask_tokens[:, i, :]) for i, head in enumerate(heads)], dim=1)
    batch, channels, height, width = upscaled.shape
    masks = (hyper_in @ upscaled.view(batch, channels, height * width)).view(
        batch, -1, height, width
    )
    return masks, mask_decoder.iou_prediction_head(iou_token)


def run_decoder(
    prompt_encoder: PromptEncoder,
    mask_decoder: MaskDecoder,
    embeddings: torch.Tensor,
    groups: Sequence[PromptGroup],
    record_upscaled: bool,
) -> DecoderOutputs:
    """Decode every group against its images' embeddings (`B x 256 x h x w`), one call a
    group, keeping all four mask outputs so that training can use the single-mask or the
    multimask ones per object."""
    dense_pe = prompt_encoder.get_dense_pe()
    logits, scores = [], []
    with recorded_upscaling(mask_decoder, record_upscaled) as upscaled:
        for group in groups:
            sparse, dense = encode_prompts(prompt_encoder, group)
            group_logits, group_scores = predict_masks(
                mask_decoder, embeddings[group.images], dense_pe, sparse, dense
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
    """Image embeddings `B x 256 x h x w` and the requested encoder taps."""
    encoder_taps = [tap for tap in taps if tap.startswith("encoder.") and tap != ENCODER_EMBED]
    with capture_taps(model, encoder_taps) as captured:
        embeddings = model.image_encoder(images)
        features: dict[str, object] = dict(captured)
    features[ENCODER_EMBED] = embeddings
    return embeddings, features


def decoder_features(outputs: DecoderOutputs, taps: Sequence[str]) -> dict[str, torch.Tensor]:
    """The decoder taps among `taps`, from a decoder run."""
    features: dict[str, torch.Tensor] = {}
    if DECODER_UPSCALED in taps and outputs.upscaled is not None:
        features[DECODER_UPSCALED] = outputs.upscaled
    if DECODER_MASK_LOGITS in taps:
        features[DECODER_MASK_LOGITS] = outputs.mask_logits
    return features
