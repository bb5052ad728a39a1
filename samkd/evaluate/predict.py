"""Masks from a SAM model for given prompts, at the original image resolution.

A SAM 2 model (`samkd.models.sam2_model.Sam2Model`) is encoded and decoded as sam2's
`SAM2ImagePredictor` does it (`samkd.models.sam2_predictor`), in its frame: its embedding is
a `Sam2Features` (with the high-resolution maps), and a model in the `square` frame takes the
samples' `square_image`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, TypeAlias

import torch
from segment_anything.modeling import Sam

from samkd.data import Sample
from samkd.data.images import ResizeLongestSide
from samkd.features import FeatureStore
from samkd.models import ENCODER_EMBED
from samkd.models.frames import SQUARE
from samkd.models.sam2_decoding import Sam2Features
from samkd.models.taps import ENCODER_HIGH_RES, is_sam2


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
# What a model's decoder takes of an image: SAM's embedding, or SAM 2's features.
Embedding: TypeAlias = torch.Tensor | Sam2Features


def stored_features(
    store: FeatureStore, name: str, image_id: str, device: torch.device
) -> torch.Tensor | Sam2Features:
    """A stored teacher's embedding `1 x 256 x h x w` of one image (a SAM 2 teacher's
    `Sam2Features`), on `device`."""
    taps = store.read(image_id)[name]
    embedding = taps[ENCODER_EMBED][None].to(device)
    if ENCODER_HIGH_RES[0] not in taps:
        return embedding
    return Sam2Features(embedding, tuple(taps[tap][None].to(device) for tap in ENCODER_HIGH_RES))


def model_inputs(model: PromptableModel, samples: list[Sample]) -> torch.Tensor:
    """The samples' images `B x 3 x S x S` as `model` takes them: in the `square` frame, their
    `square_image` (the dataset's `square_inputs` must be set)."""
    if not (is_sam2(model) and getattr(model, "frame", None) == SQUARE):  # type: ignore[arg-type]
        return torch.stack([sample.image for sample in samples])
    if any(sample.square_image is None for sample in samples):
        raise ValueError("a model in the square frame needs the samples' square images")
    return torch.stack([sample.square_image for sample in samples])  # type: ignore[misc]


@torch.inference_mode()
def encode_images(model: PromptableModel, images: torch.Tensor) -> Any:
    """Image embeddings `B x 256 x h x w` of preprocessed images `B x 3 x S x S` (a SAM 2
    model's: `Sam2Features`)."""
    if is_sam2(model):  # type: ignore[arg-type]
        from samkd.models.sam2_predictor import encode

        return encode(model, images)
    if not isinstance(model, Sam):
        return model.encode(images)
    return model.image_encoder(images.to(model.device))


@torch.inference_mode()
def predict_masks(
    model: PromptableModel,
    image_embedding: Embedding,
    prompts: ObjectPrompts,
    original_size: tuple[int, int],
    multimask: bool,
    objects_per_chunk: int = 16,
) -> MaskPrediction:
    """Decode masks for every prompt of one image.

    image_embedding: `1 x 256 x h x w` (a SAM 2 model's `Sam2Features`). Prompts are mapped to
    the model's input frame as `SamPredictor` does; masks are upscaled and cropped as
    `Sam.postprocess_masks`, then thresholded at `model.mask_threshold`. A SAM 2 model decodes
    as `SAM2ImagePredictor.predict`.
    """
    if isinstance(image_embedding, Sam2Features):
        return _predict_sam2(model, image_embedding, prompts, original_size, multimask)
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


def _predict_sam2(
    model: Any,
    features: Sam2Features,
    prompts: ObjectPrompts,
    original_size: tuple[int, int],
    multimask: bool,
    objects_per_chunk: int = 16,
) -> MaskPrediction:
    from samkd.models.sam2_predictor import predict

    masks, scores, logits = [], [], []
    for start in range(0, len(prompts), objects_per_chunk):
        chunk = prompts.select(start, start + objects_per_chunk)
        chunk_masks, chunk_scores, low_res = predict(
            model,
            features,
            original_size,
            chunk.boxes,
            chunk.point_coords,
            chunk.point_labels,
            multimask,
        )
        masks.append(chunk_masks.cpu())
        scores.append(chunk_scores.float().cpu())
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
