"""sam2's `SAM2ImagePredictor` and `SAM2AutomaticMaskGenerator` over samkd's SAM 2 models.

`Sam2FeaturePredictor` is the package's predictor with two changes: `set_image` encodes the
image through samkd's model in the model's frame (`samkd.data.preprocess_square`, as the
package does, or samkd's `longest_side` input) or installs given features (an embedding and
high-resolution maps stored in a feature file) instead; and a model in the `longest_side`
frame gets that frame's prompt and mask transforms. Prompting, decoding and mask
post-processing are the package's own, so masks, IoUs and low-resolution logits are exactly
what `SAM2ImagePredictor` gives for the same features.
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator
from sam2.sam2_image_predictor import SAM2ImagePredictor
from sam2.utils.transforms import SAM2Transforms

from samkd.data.images import resized_shape
from samkd.models.frames import SQUARE, frame_input
from samkd.models.sam2_decoding import Sam2Features

GENERATOR_OPTIONS = frozenset(inspect.signature(SAM2AutomaticMaskGenerator).parameters) - {
    "model",
    "output_mode",
    "point_grids",
    "kwargs",
}


class LongestSideTransforms(SAM2Transforms):
    """`SAM2Transforms` for a SAM 2 model in the `longest_side` frame: prompts scaled as
    `ResizeLongestSide` scales them, masks upscaled, cropped to the image and resized as
    `Sam.postprocess_masks` does."""

    def transform_coords(
        self, coords: torch.Tensor, normalize: bool = False, orig_hw: Any = None
    ) -> torch.Tensor:
        """Original-image pixels (`normalize`; else fractions of the image) -> input pixels."""
        height, width = orig_hw
        new_height, new_width = resized_shape(height, width, self.resolution)
        scale = coords.new_tensor([new_width, new_height])
        if normalize:
            scale = scale / coords.new_tensor([width, height])
        return coords * scale

    def postprocess_masks(self, masks: torch.Tensor, orig_hw: Any) -> torch.Tensor:
        height, width = orig_hw
        new_height, new_width = resized_shape(height, width, self.resolution)
        size = (self.resolution, self.resolution)
        upscaled = F.interpolate(masks.float(), size, mode="bilinear", align_corners=False)
        cropped = upscaled[..., :new_height, :new_width]
        return F.interpolate(cropped, (height, width), mode="bilinear", align_corners=False)


class Sam2FeaturePredictor(SAM2ImagePredictor):
    """`SAM2ImagePredictor` that encodes through samkd's model, or installs given features
    (see the module docstring)."""

    def __init__(
        self,
        model: Any,
        features: Sam2Features | None = None,
        original_size: tuple[int, int] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, **kwargs)
        if model.frame != SQUARE:
            square: Any = getattr(self, "_transforms")  # noqa: B009 (sam2's, untyped)
            self._transforms = LongestSideTransforms(
                model.image_size,
                self.mask_threshold,
                square.max_hole_area,
                square.max_sprinkle_area,
            )
        self.given = features
        self.given_size = original_size

    def set_image(self, image: np.ndarray) -> None:
        size = (int(image.shape[0]), int(image.shape[1]))
        if self.given is None:
            self.install(encode_image(self.model, image), size)
            return
        if size != self.given_size:
            raise ValueError(f"image is {size}, the features are of an image {self.given_size}")
        self.install(self.given, size)

    def install(self, features: Sam2Features, original_size: tuple[int, int]) -> None:
        """Use `features` (one image) as the current image's, of size `(H, W)`."""
        self.reset_predictor()
        dtype = next(self.model.sam_mask_decoder.parameters()).dtype
        features = features.to(self.device, dtype)
        self._features = {"image_embed": features.image_embed, "high_res_feats": features.high_res}
        self._orig_hw = [tuple(original_size)]
        self._is_image_set = True


@torch.inference_mode()
def encode_image(model: Any, image: np.ndarray) -> Sam2Features:
    """The features of an `H x W x 3` uint8 image, encoded in the model's frame."""
    return encode(model, frame_input(image, model.image_size, model.frame)[None])


@torch.inference_mode()
def encode(model: Any, images: torch.Tensor) -> Sam2Features:
    """The features of preprocessed images `B x 3 x S x S` (in the model's frame)."""
    embedding, high_res = model.image_encoder.encode(images.to(model.device))
    return Sam2Features(embedding, tuple(high_res))


@torch.inference_mode()
def predict(
    model: Any,
    features: Sam2Features,
    original_size: tuple[int, int],
    boxes: torch.Tensor | None,
    point_coords: torch.Tensor | None,
    point_labels: torch.Tensor | None,
    multimask: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`SAM2ImagePredictor.predict` for N objects of one image at once: boxes `N x 4` and/or
    points `N x K x 2` (labels `N x K`) in original-image pixels. Returns masks `N x M x H x W`
    (bool, original size), IoUs `N x M` and low-resolution logits `N x M x 4h x 4w` (clamped
    to +-32 as the predictor clamps them), M = 3 with `multimask`, else 1."""
    predictor = Sam2FeaturePredictor(model)
    predictor.install(features, original_size)
    transforms: Any = predictor._transforms
    coords = labels = box_corners = None
    if point_coords is not None and point_labels is not None:
        coords = transforms.transform_coords(
            point_coords.float().to(predictor.device), normalize=True, orig_hw=original_size
        )
        labels = point_labels.to(predictor.device, torch.int)
    if boxes is not None:
        box_corners = transforms.transform_boxes(
            boxes.float().to(predictor.device), normalize=True, orig_hw=original_size
        )
    masks, scores, low_res = predictor._predict(
        coords, labels, box_corners, None, multimask_output=multimask, return_logits=False
    )
    return masks, scores, low_res


def mask_generator(
    model: Any,
    options: Any,
    features: Sam2Features | None = None,
    original_size: tuple[int, int] | None = None,
) -> SAM2AutomaticMaskGenerator:
    """sam2's automatic mask generator over `model` with a settings section's options (named as
    both generators name them), giving COCO RLE masks; with `features` (one image of
    `original_size`), on them instead of the image encoder (whole-image generation only)."""
    chosen = {name: value for name, value in options if name in GENERATOR_OPTIONS}
    generator = SAM2AutomaticMaskGenerator(model, output_mode="coco_rle", **chosen)
    area = chosen.get("min_mask_region_area", 0)
    generator.predictor = Sam2FeaturePredictor(
        model, features, original_size, max_hole_area=area, max_sprinkle_area=area
    )
    if features is not None and generator.crop_n_layers:
        raise ValueError(f"crop_n_layers {generator.crop_n_layers}: crops need the image encoder")
    return generator
