from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from samkd.data import (
    PromptSampler,
    SampleBatch,
    build_dataset,
    collate_samples,
    load_rgb_image,
    preprocess_image,
    resize_boxes,
    resize_coords,
)

from .conftest import IMAGE_SIZES, make_folder_dataset, object_masks

SAMPLER = PromptSampler(mode="mixed", max_positive=2, num_negative=1)


def test_sample_fields(folder_root: Path) -> None:
    dataset = build_dataset(folder_root, image_size=64, prompts=SAMPLER)
    sample = dataset[0]
    height, width = IMAGE_SIZES["a"]
    assert (sample.index, sample.image_id) == (0, "a")
    assert sample.original_size == (height, width) and sample.input_size == (43, 64)
    assert sample.image.shape == (3, 64, 64) and sample.image.dtype == torch.float32
    image = load_rgb_image(folder_root / "image" / "a.png")
    assert torch.equal(sample.image, preprocess_image(image, 64)[0])
    assert sample.masks.shape == (3, height, width) and sample.masks.dtype == torch.bool
    rectangle = object_masks(height, width)[0]
    rows, columns = np.nonzero(rectangle)
    expected_box = [columns.min(), rows.min(), columns.max(), rows.max()]
    assert sample.boxes.dtype == torch.float32 and sample.boxes[0].tolist() == expected_box
    assert sample.point_coords is not None and sample.point_coords.shape == (3, 3, 2)
    assert sample.point_labels is not None and sample.point_labels.shape == (3, 3)
    assert len(sample.prompt_kinds) == 3 and sample.skipped == ()


def test_prompts_are_in_input_coordinates(folder_root: Path) -> None:
    dataset = build_dataset(folder_root, image_size=64, prompts=SAMPLER, seed=4)
    sample = dataset[0]
    original = SAMPLER.sample(sample.masks.numpy(), seed=4, index=0)
    size = sample.original_size
    assert sample.prompt_boxes is not None and sample.point_coords is not None
    np.testing.assert_allclose(
        sample.prompt_boxes.numpy(), resize_boxes(original.boxes, size, 64), rtol=1e-6
    )
    np.testing.assert_allclose(
        sample.point_coords.numpy(), resize_coords(original.point_coords, size, 64), rtol=1e-6
    )
    again = dataset[0].point_coords
    assert again is not None and torch.equal(again, sample.point_coords)


def test_samples_without_masks_or_prompts(folder_root: Path) -> None:
    dataset = build_dataset(folder_root, image_size=64)
    sample = dataset[2]
    assert sample.image_id == "c"
    assert sample.masks.shape == (0, 32, 32) and sample.boxes.shape == (0, 4)
    assert sample.prompt_boxes is None and sample.point_coords is None
    with_prompts = build_dataset(folder_root, image_size=64, prompts=SAMPLER)[2]
    assert with_prompts.point_coords is not None and with_prompts.point_coords.shape == (0, 3, 2)


def test_collate_and_dataloader_with_workers(folder_root: Path) -> None:
    dataset = build_dataset(folder_root, image_size=64, prompts=SAMPLER)
    pickle.loads(pickle.dumps(dataset))
    loader = DataLoader(dataset, batch_size=2, num_workers=2, collate_fn=collate_samples)
    batches = list(loader)
    assert [len(batch) for batch in batches] == [2, 1]
    first = batches[0]
    assert isinstance(first, SampleBatch)
    assert first.images.shape == (2, 3, 64, 64)
    assert first.image_ids == ["a", "b"]
    assert [m.shape[0] for m in first.masks] == [3, 1]
    in_process = collate_samples([dataset[0], dataset[1]])
    for worker, local in zip(first.point_coords, in_process.point_coords, strict=True):
        assert worker is not None and local is not None and torch.equal(worker, local)


def test_folder_mask_values_zero_one_and_255(tmp_path: Path) -> None:
    masks = make_folder_dataset(tmp_path)
    dataset = build_dataset(tmp_path, image_size=32)
    np.testing.assert_array_equal(dataset[1].masks[0].numpy(), masks["b"][0])
