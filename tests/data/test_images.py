from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from segment_anything.modeling import Sam
from segment_anything.utils.transforms import ResizeLongestSide

from samkd.data import (
    SAM_PIXEL_MEAN,
    SAM_PIXEL_STD,
    load_rgb_image,
    preprocess_image,
    resize_boxes,
    resize_coords,
)

from .conftest import write_image


def sam_reference(image: np.ndarray, image_size: int) -> torch.Tensor:
    """segment-anything's own path: ``SamPredictor.set_image`` then ``Sam.preprocess``."""
    resized = ResizeLongestSide(image_size).apply_image(image)
    pixels = torch.as_tensor(resized).permute(2, 0, 1).contiguous()[None]
    sam = SimpleNamespace(
        pixel_mean=torch.Tensor(list(SAM_PIXEL_MEAN)).view(-1, 1, 1),
        pixel_std=torch.Tensor(list(SAM_PIXEL_STD)).view(-1, 1, 1),
        image_encoder=SimpleNamespace(img_size=image_size),
    )
    return Sam.preprocess(sam, pixels)[0]


@pytest.mark.parametrize(("height", "width"), [(37, 53), (80, 23), (64, 64), (100, 150)])
def test_preprocess_matches_segment_anything(height: int, width: int) -> None:
    image = np.random.default_rng(height).integers(0, 256, (height, width, 3), dtype=np.uint8)
    tensor, input_size = preprocess_image(image, 64)
    expected = sam_reference(image, 64)
    assert tensor.dtype == torch.float32 and tensor.shape == (3, 64, 64)
    assert input_size == ResizeLongestSide(64).apply_image(image).shape[:2]
    assert torch.equal(tensor, expected)


def test_coordinates_match_segment_anything() -> None:
    transform = ResizeLongestSide(64)
    coords = np.array([[[3.0, 7.0], [52.0, 36.0]]])
    boxes = np.array([[1.0, 2.0, 40.0, 30.0], [0.0, 0.0, 52.0, 36.0]])
    np.testing.assert_allclose(
        resize_coords(coords, (37, 53), 64), transform.apply_coords(coords, (37, 53))
    )
    np.testing.assert_allclose(
        resize_boxes(boxes, (37, 53), 64), transform.apply_boxes(boxes, (37, 53))
    )


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "CMYK", "1", "I;16"])
def test_image_modes_become_rgb(tmp_path: Path, mode: str) -> None:
    rgb = write_image(tmp_path / "source.png", 12, 9)
    converted = Image.fromarray(rgb).convert("RGBA" if mode == "I;16" else mode)
    if mode == "I;16":
        grey = np.asarray(Image.fromarray(rgb).convert("L")).astype(np.uint16) * 257
        converted = Image.fromarray(grey)
    suffix = ".jpg" if mode == "CMYK" else ".png"
    converted.save(tmp_path / f"image{suffix}")
    loaded = load_rgb_image(tmp_path / f"image{suffix}")
    assert loaded.shape == (12, 9, 3) and loaded.dtype == np.uint8
    if mode in ("RGBA", "P"):
        np.testing.assert_array_equal(loaded, np.asarray(converted.convert("RGB")))
    if mode in ("L", "I;16"):
        grey = np.asarray(Image.fromarray(rgb).convert("L"))
        np.testing.assert_array_equal(loaded, np.repeat(grey[:, :, None], 3, axis=2))


def test_exif_orientation_is_optional(tmp_path: Path) -> None:
    pixels = write_image(tmp_path / "plain.png", 10, 20)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees clockwise
    Image.fromarray(pixels).save(tmp_path / "rotated.jpg", exif=exif, quality=100)
    assert load_rgb_image(tmp_path / "rotated.jpg").shape == (10, 20, 3)
    assert load_rgb_image(tmp_path / "rotated.jpg", exif_transpose=True).shape == (20, 10, 3)
