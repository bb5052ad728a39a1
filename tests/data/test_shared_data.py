"""Optional checks on the real datasets in the repository's sibling ``../shared/data``."""

from __future__ import annotations

from pathlib import Path

import pytest

from samkd.data import PromptSampler, build_dataset

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def shared_dataset(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"{path} is not available")
    return path


@pytest.mark.parametrize("split", ["train", "val"])
def test_coco_sample_every_image_and_mask_loads(split: str) -> None:
    dataset = build_dataset(shared_dataset("coco_sample") / split, image_size=256)
    assert dataset.validate() == []
    assert len(dataset) == {"train": 6, "val": 2}[split]
    sample = dataset[0]
    assert sample.masks.shape[0] > 0 and sample.masks.shape[1:] == sample.original_size


def test_pine_tree_coco_every_image_and_mask_loads() -> None:
    root = shared_dataset("pine_tree_coco")
    dataset = build_dataset(root, image_size=256, prompts=PromptSampler(mode="points"))
    assert dataset.validate() == []
    assert len(dataset) == 16
    assert sum(len(record.mask_sources) for record in dataset.records) == 331
    sample = dataset[0]
    assert sample.masks.shape[1:] == sample.original_size
    assert sample.point_labels is not None and (sample.point_labels == 1).all()
