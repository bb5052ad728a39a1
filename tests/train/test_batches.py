"""Training batches: targets aligned with SAM's logits, and feature-preserving augmentation."""

import numpy as np
import torch

from samkd.data import build_dataset
from samkd.data.prompts import PromptSampler
from samkd.train.batches import (
    Augmentation,
    DistillationDataset,
    collate_training,
    flip_features,
    flip_sample,
    low_res_targets,
)


def test_low_res_targets_follow_resize_and_padding() -> None:
    masks = torch.zeros(1, 100, 200, dtype=torch.bool)
    masks[0, :, :100] = True  # left half of a wide image
    targets = low_res_targets(masks, input_size=(128, 256), image_size=256)
    assert targets.shape == (1, 64, 64)
    assert targets[0, :32, :32].all()  # the left half of the valid top band
    assert not targets[0, :32, 32:].any()
    assert not targets[0, 32:].any()  # padding below the image


def test_flip_features_mirrors_only_the_valid_columns() -> None:
    embedding = torch.arange(2 * 4 * 4, dtype=torch.float32).reshape(2, 4, 4)
    attention = torch.rand(16, 16)
    flipped = flip_features({"t": {"embed": embedding, "qk": attention}}, 128, 256)["t"]
    assert torch.equal(flipped["embed"][..., :2], embedding[..., :2].flip(-1))
    assert torch.equal(flipped["embed"][..., 2:], embedding[..., 2:])
    assert torch.equal(flipped["qk"], attention)


def test_flip_sample_and_photometric_only_on_the_student(tmp_path) -> None:
    from samkd.demo.shapes import write_shapes_dataset

    root = write_shapes_dataset(tmp_path / "shapes", 2, (96, 128))
    dataset = build_dataset(root, image_size=256, prompts=PromptSampler(mode="box"))
    sample = dataset[0]
    flipped = flip_sample(sample)
    height, width = sample.input_size
    assert torch.equal(flipped.image[:, :height, :width], sample.image[:, :height, :width].flip(-1))
    assert torch.equal(flipped.masks, sample.masks.flip(-1))
    assert np.allclose(flipped.boxes[:, 0], 127 - sample.boxes[:, 2])
    assert torch.allclose(flip_sample(flipped).prompt_boxes, sample.prompt_boxes)

    augmented = DistillationDataset(dataset, None, Augmentation(brightness=0.5, contrast=0.2), 0)
    item = augmented[0]
    assert item.teacher_image is not None and torch.equal(item.teacher_image, sample.image)
    assert not torch.equal(item.sample.image, sample.image)
    batch = collate_training([item, augmented[1]])
    assert batch.teacher_inputs().shape == batch.images.shape
    plain = DistillationDataset(dataset, None, Augmentation(), 0)[0]
    assert plain.teacher_image is None
