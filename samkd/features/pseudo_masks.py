"""Teacher pseudo-masks: the automatic mask generation of the teacher's family on a stored
embedding (segment-anything's; a SAM 2 teacher's, sam2's `SAM2AutomaticMaskGenerator`).

    masks = generate_pseudo_masks(teacher, embedding, (480, 640), settings.extract.pseudo_masks)
    masks[0]       # {"size": [480, 640], "counts": "...", "predicted_iou": 0.97, ...}
    decode_pseudo_masks(masks, (480, 640))               # N x 480 x 640 bool

`SamAutomaticMaskGenerator` runs as it is (point grid, predicted-IoU and stability filtering,
box NMS), with one crop (the whole image) and no small-region clean-up (it needs OpenCV); only
its predictor differs: `EmbeddingPredictor.set_image` installs the given embedding instead of
running the image encoder. The masks are COCO RLE (pycocotools) at the original image size,
stored in a feature file as one JSON string per image (`encode_rows`, `decode_rows`).

A SAM 2 teacher's generator runs the same way on its stored features (`Sam2Features`: the
embedding and the two high-resolution maps), through `samkd.models.sam2_predictor`, in the
teacher's frame.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from segment_anything import SamAutomaticMaskGenerator, SamPredictor
from segment_anything.modeling import Sam

from samkd.data.images import ResizeLongestSide
from samkd.models.sam2_decoding import Sam2Features

if TYPE_CHECKING:
    from samkd.settings import MaskGeneratorSettings, PseudoMaskSettings

# The keys of one stored pseudo-mask, in their stored order.
MASK_KEYS = ("size", "counts", "predicted_iou", "stability_score")

# The generator's options that settings may give, under the generator's own names; what a
# settings section leaves out (the pseudo-masks' crops) keeps segment-anything's default.
GENERATOR_OPTIONS = frozenset(inspect.signature(SamAutomaticMaskGenerator).parameters) - {
    "model",
    "output_mode",
    "point_grids",
}


class EmbeddingPredictor(SamPredictor):
    """A `SamPredictor` whose image embedding is given: `set_image` installs `embedding`
    (`1 x 256 x h x w`) for an image of `original_size` instead of encoding the image, whose
    pixels are never read. Resizes as `samkd.data` does (`ResizeLongestSide`)."""

    def __init__(self, model: Sam, embedding: torch.Tensor, original_size: tuple[int, int]):
        super().__init__(model)
        self.transform = ResizeLongestSide(model.image_encoder.img_size)
        self.embedding = embedding
        self.embedding_size = (int(original_size[0]), int(original_size[1]))

    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        size = (int(image.shape[0]), int(image.shape[1]))
        if size != self.embedding_size:
            raise ValueError(f"image is {size}, the embedding is of an image {self.embedding_size}")
        self.reset_image()
        self.original_size = size
        self.input_size = self.transform.get_preprocess_shape(*size, self.transform.target_length)
        self.features = self.embedding
        self.is_image_set = True


def build_mask_generator(model: Sam, options: MaskGeneratorSettings) -> SamAutomaticMaskGenerator:
    """segment-anything's generator over `model` with the options of a settings section
    (`extract.pseudo_masks`, `eval.amg`), giving COCO RLE masks. Its predictor resizes as
    `samkd.data` does (`ResizeLongestSide`), so that it sees the images training saw."""
    chosen = {name: value for name, value in options if name in GENERATOR_OPTIONS}
    generator = SamAutomaticMaskGenerator(model, output_mode="coco_rle", **chosen)
    generator.predictor.transform = ResizeLongestSide(model.image_encoder.img_size)
    return generator


def embedding_mask_generator(
    model: Sam,
    embedding: torch.Tensor,
    original_size: tuple[int, int],
    options: MaskGeneratorSettings,
) -> SamAutomaticMaskGenerator:
    """`build_mask_generator` whose predictor installs `embedding` (`256 x h x w` or
    `1 x 256 x h x w`, on the model's device) for an image of `original_size` `(H, W)`
    instead of running the image encoder: only whole-image generation (no crops) works."""
    height, width = (int(side) for side in original_size)
    if height < 1 or width < 1:
        raise ValueError(f"original_size must be positive, got {tuple(original_size)}")
    expected = (model.prompt_encoder.embed_dim, *model.prompt_encoder.image_embedding_size)
    if tuple(embedding.shape) not in (expected, (1, *expected)):
        raise ValueError(f"embedding is {tuple(embedding.shape)}, the teacher takes {expected}")
    embedding = embedding.reshape(1, *expected)
    if embedding.device != model.device:
        raise ValueError(f"embedding is on {embedding.device}, the teacher on {model.device}")
    generator = build_mask_generator(model, options)
    if generator.crop_n_layers:
        raise ValueError(f"crop_n_layers {generator.crop_n_layers}: crops need the image encoder")
    dtype = next(model.mask_decoder.parameters()).dtype
    generator.predictor = EmbeddingPredictor(model, embedding.to(dtype), (height, width))
    return generator


def generate_pseudo_masks(
    model: Sam,
    embedding: torch.Tensor | Sam2Features,
    original_size: tuple[int, int],
    options: PseudoMaskSettings,
) -> list[dict[str, Any]]:
    """The automatic masks of one image from its image embedding.

    Arguments:
      model (Sam): the teacher; only its prompt encoder and mask decoder run (its image
        encoder's `img_size` gives the input size), on the embedding's device.
      embedding (torch.Tensor or Sam2Features): `256 x h x w` or `1 x 256 x h x w`, the
        teacher's embedding of the image (as stored in the feature file); a SAM 2 teacher's
        features of that one image.
      original_size (tuple(int, int)): `(H, W)` of the image file.
      options (PseudoMaskSettings): the generator's settings (`extract.pseudo_masks`).

    Returns:
      list(dict): at most `options.max_masks` masks, highest predicted IoU first, each
        `{"size": [H, W], "counts": str, "predicted_iou": float, "stability_score": float}`
        (COCO RLE at the original size). The same inputs give the same list.
    """
    height, width = (int(side) for side in original_size)
    if isinstance(embedding, Sam2Features):
        from samkd.models.sam2_predictor import mask_generator

        generator: Any = mask_generator(model, options, embedding, (height, width))
    else:
        generator = embedding_mask_generator(model, embedding, (height, width), options)
    # The pixels are never read: a broadcast view stands in for the image.
    placeholder = np.broadcast_to(np.zeros((1, 1, 3), dtype=np.uint8), (height, width, 3))
    with torch.inference_mode():
        records = generator.generate(placeholder)
    records.sort(key=lambda record: -record["predicted_iou"])  # stable: ties keep their order
    return [
        {
            "size": [int(side) for side in record["segmentation"]["size"]],
            "counts": str(record["segmentation"]["counts"]),
            "predicted_iou": float(record["predicted_iou"]),
            "stability_score": float(record["stability_score"]),
        }
        for record in records[: options.max_masks]
    ]


def decode_pseudo_masks(
    rles: Sequence[Mapping[str, Any]], image_size: tuple[int, int] | None = None
) -> np.ndarray:
    """`N x H x W` bool masks of COCO RLEs (pycocotools); `image_size` `(H, W)` is checked
    against each RLE's size, and gives the size of an empty list (`0 x H x W`). The RLEs
    are trusted, as `generate_pseudo_masks` and a checksum-verified file give them:
    pycocotools does not check that the runs fill the image."""
    sizes = {(int(rle["size"][0]), int(rle["size"][1])) for rle in rles}
    if image_size is not None:
        sizes.add((int(image_size[0]), int(image_size[1])))
    if len(sizes) != 1:
        if not sizes:
            raise ValueError("no masks and no image_size: the size of the masks is unknown")
        raise ValueError(f"masks of different sizes: {sorted(sizes)}")
    height, width = sizes.pop()
    if not rles:
        return np.zeros((0, height, width), dtype=bool)
    encoded = [{"size": list(rle["size"]), "counts": rle["counts"]} for rle in rles]
    decoded = mask_utils.decode(encoded)
    return np.ascontiguousarray(decoded.transpose(2, 0, 1), dtype=bool)


def encode_rows(rows: Sequence[Sequence[Mapping[str, Any]]]) -> list[str]:
    """One compact JSON string per image of its masks (keys in `MASK_KEYS` order), as stored."""
    texts = []
    for index, masks in enumerate(rows):
        try:
            records = [
                {
                    "size": [int(mask["size"][0]), int(mask["size"][1])],
                    "counts": str(mask["counts"]),
                    "predicted_iou": float(mask["predicted_iou"]),
                    "stability_score": float(mask["stability_score"]),
                }
                for mask in masks
            ]
            texts.append(json.dumps(records, separators=(",", ":"), allow_nan=False))
        except (KeyError, IndexError, TypeError, ValueError) as error:
            raise ValueError(f"pseudo-masks of row {index}: not RLE masks ({error})") from None
    return texts


def decode_rows(texts: Sequence[str | bytes]) -> list[list[dict[str, Any]]]:
    """The masks of each stored JSON string (see `encode_rows`)."""
    rows = []
    for index, text in enumerate(texts):
        try:
            masks = json.loads(text)
        except ValueError as error:
            raise ValueError(f"pseudo-masks of row {index}: not JSON ({error})") from None
        if not isinstance(masks, list) or not all(
            isinstance(mask, dict) and tuple(mask) == MASK_KEYS for mask in masks
        ):
            raise ValueError(f"pseudo-masks of row {index}: expected a list of {MASK_KEYS} records")
        rows.append(masks)
    return rows
