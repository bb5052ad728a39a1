"""Image decoding and SAM's input transform (resize longest side, normalise, pad).

The transform reproduces ``ResizeLongestSide(image_size).apply_image`` followed by
``Sam.preprocess`` from segment-anything exactly: the same output shape rounding, the same
Pillow bilinear (antialiased) resize, SAM's pixel mean and std, zero padding at the bottom
and right after normalisation. One deliberate difference: a side that rounds to 0 pixels
(a 10000 x 2 image) is kept at 1, where segment-anything would fail.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from segment_anything.utils import transforms
from torchvision.transforms import functional as TF

from samkd.data.errors import DataError

SAM_PIXEL_MEAN: tuple[float, float, float] = (123.675, 116.28, 103.53)
SAM_PIXEL_STD: tuple[float, float, float] = (58.395, 57.12, 57.375)
# SAM 2's normalisation of pixels in [0, 1] (ImageNet's): SAM's mean and std divided by 255.
SAM2_PIXEL_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
SAM2_PIXEL_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
)

# Pillow signals a broken file through several exception types depending on the codec.
IMAGE_DECODE_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    UnidentifiedImageError,
    Image.DecompressionBombError,
)


def is_image_file(path: Path) -> bool:
    """Whether ``path`` has one of the image extensions the readers accept."""
    return path.suffix.lower() in IMAGE_EXTENSIONS


def load_rgb_image(path: Path, *, exif_transpose: bool = False) -> np.ndarray:
    """Decode an image file to an ``H x W x 3`` uint8 RGB array.

    Greyscale, palette, CMYK and 16-bit images are converted to RGB; an alpha channel is
    dropped, not composited. EXIF orientation is ignored unless ``exif_transpose`` is set,
    because mask annotations (PNG masks, COCO ``width``/``height``, SA-1B RLE sizes) are
    normally made on the pixels as stored.

    Raises:
        DataError: the file is missing, truncated or not an image.
    """
    try:
        with Image.open(path) as file:
            file.load()
            image = ImageOps.exif_transpose(file) if exif_transpose else file
            return _to_rgb_array(image)
    except FileNotFoundError as error:
        raise DataError(path, "image file not found") from error
    except IMAGE_DECODE_ERRORS as error:
        raise DataError(path, f"cannot be read as an image ({error})") from error


def read_image_size(path: Path) -> tuple[int, int]:
    """``(H, W)`` of an image file as stored, from its header only.

    Raises:
        DataError: the file is missing or not an image.
    """
    try:
        with Image.open(path) as file:
            width, height = file.size
    except FileNotFoundError as error:
        raise DataError(path, "image file not found") from error
    except IMAGE_DECODE_ERRORS as error:
        raise DataError(path, f"cannot be read as an image ({error})") from error
    return height, width


def _to_rgb_array(image: Image.Image) -> np.ndarray:
    if image.mode in ("I;16", "I;16L", "I;16B", "I"):
        # Pillow's RGB conversion clips 16-bit values at 255 instead of rescaling them.
        grey = np.asarray(image).astype(np.int64) // 257
        grey = np.clip(grey, 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if image.mode == "P":
        # Going through RGBA keeps palette transparency from triggering a Pillow warning.
        image = image.convert("RGBA")
    return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()


def resized_shape(height: int, width: int, image_size: int) -> tuple[int, int]:
    """``(h, w)`` after scaling the longest side to ``image_size``, rounded as SAM rounds.

    Each side is at least 1 pixel: rounding alone takes the short side of a 10000 x 2 image
    to 0 at 1024, which no resize accepts.
    """
    scale = image_size * 1.0 / max(height, width)
    return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))


class ResizeLongestSide(transforms.ResizeLongestSide):
    """segment-anything's ``ResizeLongestSide`` with ``resized_shape``'s sizes.

    Use it wherever the original is used (prompt coordinates, ``Sam.postprocess_masks``'s
    ``input_size``), so that images of extreme aspect ratio agree with ``preprocess_image``.
    """

    @staticmethod
    def get_preprocess_shape(oldh: int, oldw: int, long_side_length: int) -> tuple[int, int]:
        return resized_shape(oldh, oldw, long_side_length)


def resize_longest_side(image: np.ndarray, image_size: int) -> np.ndarray:
    """Resize an ``H x W x 3`` uint8 image so its longest side is ``image_size``.

    Returns an ``h x w x 3`` uint8 array, equal to ``ResizeLongestSide.apply_image``.
    """
    height, width = image.shape[:2]
    new_height, new_width = resized_shape(height, width, image_size)
    if (new_height, new_width) == (height, width):
        return image
    resized = Image.fromarray(image).resize((new_width, new_height), Image.Resampling.BILINEAR)
    return np.array(resized)


def normalize_and_pad(image: np.ndarray, image_size: int) -> torch.Tensor:
    """Turn an ``h x w x 3`` uint8 image into SAM's ``3 x S x S`` float32 input.

    Pixels are normalised with SAM's mean and std, then zero-padded at the bottom and
    right to ``S = image_size``, as ``Sam.preprocess`` does.
    """
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float()
    mean = torch.tensor(SAM_PIXEL_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(SAM_PIXEL_STD, dtype=torch.float32).view(3, 1, 1)
    normalized = (pixels - mean) / std
    pad_bottom = image_size - normalized.shape[1]
    pad_right = image_size - normalized.shape[2]
    return torch.nn.functional.pad(normalized, (0, pad_right, 0, pad_bottom))


def preprocess_image(
    image: np.ndarray, image_size: int, long_side: int | None = None
) -> tuple[torch.Tensor, tuple[int, int]]:
    """SAM's full input transform of an ``H x W x 3`` uint8 image.

    Returns the ``3 x S x S`` float32 input and the ``(h, w)`` size of the resized image
    inside it, before padding. ``long_side`` (default ``S``) is the resized image's longest
    side: less than ``S`` shows the image zoomed out, with more padding.
    """
    resized = resize_longest_side(image, long_side or image_size)
    return normalize_and_pad(resized, image_size), (resized.shape[0], resized.shape[1])


def preprocess_square(image: np.ndarray, image_size: int) -> torch.Tensor:
    """SAM 2's input transform (``SAM2Transforms``) of an ``H x W x 3`` uint8 image: to
    [0, 1], the whole image resized to ``S x S`` (bilinear, antialiased; the aspect ratio is
    not kept), normalised with SAM 2's mean and std. Returns ``3 x S x S`` float32."""
    pixels = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float().div(255)
    resized = TF.resize(pixels, [image_size, image_size], antialias=True)
    return TF.normalize(resized, list(SAM2_PIXEL_MEAN), list(SAM2_PIXEL_STD))


def resize_coords(
    coords: np.ndarray, original_size: tuple[int, int], image_size: int
) -> np.ndarray:
    """Map ``... x 2`` ``(x, y)`` coordinates from the original image to the resized input.

    Same arithmetic as ``ResizeLongestSide.apply_coords``; boxes ``N x 4`` can be passed
    reshaped to ``N x 2 x 2``.
    """
    old_height, old_width = original_size
    new_height, new_width = resized_shape(old_height, old_width, image_size)
    scaled = np.array(coords, dtype=np.float64, copy=True)
    scaled[..., 0] = scaled[..., 0] * (new_width / old_width)
    scaled[..., 1] = scaled[..., 1] * (new_height / old_height)
    return scaled


def resize_boxes(boxes: np.ndarray, original_size: tuple[int, int], image_size: int) -> np.ndarray:
    """Map ``N x 4`` XYXY boxes to the resized input, as ``ResizeLongestSide.apply_boxes``."""
    return resize_coords(boxes.reshape(-1, 2, 2), original_size, image_size).reshape(-1, 4)
