"""A generated segmentation dataset: ellipses and rectangles on textured backgrounds.

Written in samkd's folder layout (`image/<id>.png`, `mask/<id>/obj_<k>.png`), so every command
reads it like a user's own data.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image


def _texture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A smooth random colour field with noise: `H x W x 3` float in [0, 255]."""
    coarse = rng.uniform(0, 255, size=(4, 4, 3)).astype(np.float32)
    smooth = np.asarray(
        Image.fromarray(coarse.astype(np.uint8)).resize((width, height), Image.Resampling.BILINEAR),
        dtype=np.float32,
    )
    return np.clip(smooth + rng.normal(0, 12, size=(height, width, 3)), 0, 255)


def _shape_mask(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """One ellipse or rectangle, `H x W` bool, at least a few dozen pixels."""
    rows, cols = np.mgrid[0:height, 0:width]
    center_y, center_x = rng.uniform(0.2, 0.8) * height, rng.uniform(0.2, 0.8) * width
    half_h = rng.uniform(0.06, 0.25) * height
    half_w = rng.uniform(0.06, 0.25) * width
    if rng.random() < 0.5:
        return ((rows - center_y) / half_h) ** 2 + ((cols - center_x) / half_w) ** 2 <= 1.0
    return (np.abs(rows - center_y) <= half_h) & (np.abs(cols - center_x) <= half_w)


def make_sample(
    rng: np.random.Generator, height: int, width: int, max_objects: int
) -> tuple[np.ndarray, list[np.ndarray]]:
    """An `H x W x 3` uint8 image and the boolean masks of its visible objects."""
    image = _texture(rng, height, width)
    owner = np.full((height, width), -1)
    count = int(rng.integers(1, max_objects + 1))
    for index in range(count):
        mask = _shape_mask(rng, height, width)
        colour = rng.uniform(0, 255, size=3)
        shade = _texture(rng, height, width) * 0.3 + colour * 0.7
        image[mask] = shade[mask]
        owner[mask] = index
    masks = [owner == index for index in range(count)]
    return image.astype(np.uint8), [mask for mask in masks if mask.sum() >= 32]


def write_shapes_dataset(
    root: Path,
    num_images: int,
    image_size: tuple[int, int] = (192, 256),
    max_objects: int = 3,
    seed: int = 0,
) -> Path:
    """Write `num_images` generated images with masks under `root` (folder layout).

    Deterministic for a given seed. Written to a temporary folder, then renamed, so an
    interrupted call leaves no half-written dataset behind. Returns `root`.
    """
    root = Path(root)
    temporary = root.with_name(f".{root.name}.tmp-{os.getpid()}")
    rng = np.random.default_rng(seed)
    height, width = image_size
    for index in range(num_images):
        image, masks = make_sample(rng, height, width, max_objects)
        image_id = f"shape_{index:05d}"
        (temporary / "image").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(temporary / "image" / f"{image_id}.png")
        mask_dir = temporary / "mask" / image_id
        mask_dir.mkdir(parents=True, exist_ok=True)
        for number, mask in enumerate(masks):
            Image.fromarray(mask.astype(np.uint8) * 255).save(mask_dir / f"obj_{number}.png")
    temporary.rename(root)
    return root
