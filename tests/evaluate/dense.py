"""A generated dataset of many small objects per image (cells, nuclei), in the `labels`
layout: `images/<id>.png` and `labels/<id>.png`, one id per object."""

from pathlib import Path

import numpy as np
from PIL import Image


def write_dense_dataset(
    root: Path, images: int, objects: int, size: tuple[int, int] = (288, 384), seed: int = 0
) -> Path:
    """`images` images of `size` `(H, W)`, each with `objects` small ellipses that do not
    overlap (radii 4 to 9 px), in random colours on a textured background."""
    rng = np.random.default_rng(seed)
    height, width = size
    rows, columns = np.mgrid[0:height, 0:width]
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for number in range(images):
        image = rng.integers(20, 70, size=(height, width, 3)).astype(np.uint8)
        labels = np.zeros(size, dtype=np.uint8)
        placed = 0
        while placed < objects:
            ry, rx = rng.uniform(4, 9, size=2)
            cy, cx = rng.uniform(ry, height - ry), rng.uniform(rx, width - rx)
            inside = ((rows - cy) / ry) ** 2 + ((columns - cx) / rx) ** 2 <= 1
            if labels[inside].any():
                continue
            placed += 1
            labels[inside] = placed
            image[inside] = rng.integers(120, 255, size=3)
        Image.fromarray(image).save(root / "images" / f"cells_{number}.png")
        Image.fromarray(labels).save(root / "labels" / f"cells_{number}.png")
    return root
