"""The images the page looks at: a dataset folder in any layout samkd reads (with its
ground-truth objects), or an uploaded picture (without)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from samkd.data import build_dataset
from samkd.settings import DataSettings
from samkd.view.predictor import ViewImage


class DatasetImages:
    """A dataset folder read as `samkd eval` reads it (`data.layout`, `data.annotation_file`,
    `data.mask_threshold`, `data.on_error`), every object of each image kept."""

    def __init__(self, root: Path, data: DataSettings) -> None:
        self.root = root
        self.dataset = build_dataset(
            root,
            layout=data.layout,
            annotation_file=data.annotation_file,
            on_error=data.on_error,
            mask_threshold=data.mask_threshold,
        )
        self.ids = [record.image_id for record in self.dataset.records]

    def __len__(self) -> int:
        return len(self.ids)

    def load(self, index: int) -> ViewImage:
        """Image `index` with its objects, as stored (no resizing)."""
        loaded = self.dataset.load_objects(index)
        image_id = self.ids[index]
        return ViewImage(f"data/{index}/{image_id}", image_id, loaded.image, loaded.masks)


def uploaded_image(pixels: np.ndarray, name: str = "upload") -> ViewImage:
    """An uploaded `H x W x 3` uint8 picture; its key is the hash of its pixels, so uploading
    it again reuses its embeddings."""
    pixels = np.ascontiguousarray(pixels[..., :3], dtype=np.uint8)
    digest = hashlib.sha1(pixels.tobytes())
    digest.update(repr(pixels.shape).encode())
    return ViewImage(f"upload/{digest.hexdigest()}", name, pixels)
