"""Masks from a SAM model for given prompts, at the original image resolution."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, TypeAlias

import torch
from segment_anything.modeling import Sam

from samkd.data.images import ResizeLongestSide


@dataclass(frozen=True)
class ObjectPrompts:
    """Prompts for N objects of one image, in original-image pixel coordinates.

    boxes: `N x 4` XYXY or None; point_coords: `N x K x 2` (x, y) or None;
    point_labels: `N x K` (1 positive, 0 negative) or None.
    """

    boxes: torch.Tensor | None = None
    point_coords: torch.Tensor | None = None
    point_labels: torch.Tensor | None = None

    def __len__(self) -> int:
        if self.boxes is not None:
            return self.boxes.shape[0]
        return 0 if self.point_coords is None else self.point_coords.shape[0]

    def select(self, start: int, stop: int) -> ObjectPrompts:
        def part(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor[start:stop]

        return ObjectPrompts(part(self.boxes), part(self.point_coords), part(self.point_labels))


@dataclass(frozen=True)
class MaskPrediction:
    """Decoder outputs for N objects: `masks` N x M x H x W bool (original size),
    `iou_predictions` N x M, `low_res_logits` N x M x 4h x 4w (M = 3 multimask, else 1)."""

    masks: torch.Tensor
    iou_predictions: torch.Tensor
    low_res_logits: torch.Tensor


class ExportedModel(Protocol):
    """A model run outside PyTorch (an ONNX pair, `samkd.export.OnnxSam`) that evaluation
    measures where it measures a `Sam`: `encode` and `predict` stand for `encode_images` and
    `predict_masks`."""

    @property
    def device(self) -> torch.device: ...

    def encode(self, images: torch.Tensor) -> torch.Tensor: ...

    def predict(
        self,
        image_embedding: torch.Tensor,
        prompts: ObjectPrompts,
        original_size: tuple[int, int],
        multimask: bool,
    ) -> MaskPrediction: ...


PromptableModel: TypeAlias = Sam | ExportedModel


@torch.inference_mode()
def encode_images(model: PromptableModel, images: torch.Tensor) -> torch.Tensor:
    """Image embeddings `B x 256 x h x w` of preprocessed images `B x 3 x S x S`."""
    if not isinstance(model, Sam):
        return model.encode(images)
    return model.image_encoder(images.to(model.device))


@torch.inference_mode()
def predict_masks(
    model: PromptableModel,
    image_embedding: torch.Tensor,
    prompts: ObjectPrompts,
    original_size: tuple[int, int],
    multimask: bool,
    objects_per_chunk: int = 16,
) -> MaskPrediction:
    """Decode masks for every prompt of one image.

    image_embedding: `1 x 256 x h x w`. Prompts are mapped to the model's input frame as
    `SamPredictor` does; masks are upscaled and cropped as `Sam.postprocess_masks`, then
    thresholded at `model.mask_threshold`.
    """
    if not isinstance(model, Sam):
        return model.predict(image_embedding, prompts, original_size, multimask)
    transform = ResizeLongestSide(model.image_encoder.img_size)
    input_size = transform.get_preprocess_shape(*original_size, model.image_encoder.img_size)
    masks, scores, logits = [], [], []
    for start in range(0, len(prompts), objects_per_chunk):
        chunk = prompts.select(start, start + objects_per_chunk)
        sparse, dense = model.prompt_encoder(
            points=_input_frame_points(chunk, transform, original_size, model.device),
            boxes=_input_frame_boxes(chunk, transform, original_size, model.device),
            masks=None,
        )
        low_res, iou = model.mask_decoder(
            image_embeddings=image_embedding,
            image_pe=model.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask,
        )
        upscaled = model.postprocess_masks(low_res, input_size, original_size)
        masks.append((upscaled > model.mask_threshold).cpu())
        scores.append(iou.float().cpu())
        logits.append(low_res.float().cpu())
    return MaskPrediction(torch.cat(masks), torch.cat(scores), torch.cat(logits))


def _input_frame_boxes(
    prompts: ObjectPrompts,
    transform: ResizeLongestSide,
    original_size: tuple[int, int],
    device: torch.device,
) -> torch.Tensor | None:
    if prompts.boxes is None:
        return None
    return transform.apply_boxes_torch(prompts.boxes.float(), original_size).to(device)


def _input_frame_points(
    prompts: ObjectPrompts,
    transform: ResizeLongestSide,
    original_size: tuple[int, int],
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    if prompts.point_coords is None or prompts.point_labels is None:
        return None
    coords = transform.apply_coords_torch(prompts.point_coords.float(), original_size)
    return coords.to(device), prompts.point_labels.to(device)
