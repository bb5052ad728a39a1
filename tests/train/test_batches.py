"""Training batches: targets aligned with SAM's logits, feature-preserving augmentation, and
geometric augmentation that keeps masks, boxes and prompts on the image."""

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from pycocotools import mask as mask_utils

from samkd.data import Geometry, Sample, SegmentationDataset, build_dataset
from samkd.data.masks import mask_box
from samkd.data.prompts import PromptSampler
from samkd.train.batches import (
    Augmentation,
    DistillationDataset,
    collate_training,
    flip_features,
    flip_sample,
    low_res_targets,
)
from samkd.train.label_free import LabelFree


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


# A dark 96 x 128 image whose one object is a bright rectangle, off-centre and wider than high.
RECTANGLE = (slice(30, 60), slice(40, 100))
SIZE = (96, 128)


def write_rectangle(root: Path, with_mask: bool = True) -> Path:
    image = np.full((*SIZE, 3), 20, dtype=np.uint8)
    image[RECTANGLE] = 235
    (root / "image").mkdir(parents=True)
    Image.fromarray(image).save(root / "image" / "rect.png")
    if with_mask:
        (root / "mask" / "rect").mkdir(parents=True)
        Image.fromarray(image[..., 0] > 128).save(root / "mask" / "rect" / "obj.png")
    return root


def rectangle_dataset(root: Path) -> SegmentationDataset:
    """The rectangle at 128 px, three positive points per object and unjittered boxes."""
    sampler = PromptSampler(mode="points", box_jitter=0.0, min_positive=3, max_positive=3)
    return build_dataset(root, image_size=128, prompts=sampler)


def assert_aligned(sample: Sample) -> None:
    """The image's bright pixels are its one object: its mask, tight box, prompt box and
    positive points."""
    height, width = sample.input_size
    bright = sample.image[0, :height, :width] > 0.5  # dark -1.8, bright 1.9, padding 0
    (mask,) = sample.masks
    assert sample.boxes[0].tolist() == mask_box(mask.numpy()).tolist()
    resized = F.interpolate(mask[None, None].float(), size=(height, width), mode="bilinear")
    on_image = resized[0, 0] > 0.5
    assert (bright & on_image).sum() / (bright | on_image).sum() > 0.95
    rows, columns = bright.nonzero(as_tuple=True)
    box = [columns.min(), rows.min(), columns.max(), rows.max()]
    assert sample.prompt_boxes is not None and sample.point_coords is not None
    assert torch.allclose(sample.prompt_boxes[0], torch.tensor(box).float(), atol=2)
    points = sample.point_coords[0]
    assert sample.point_labels is not None and (sample.point_labels[0] == 1).all()
    # Points are original pixels scaled into the input frame: scaled back, they are on the mask.
    scale = torch.tensor([width / sample.original_size[1], height / sample.original_size[0]])
    x, y = (points / scale).round().long().T
    assert mask[y, x].all()
    x, y = points.round().long().T
    assert (sample.image[0, y, x] > 0).all()


@pytest.mark.parametrize(
    ("augmentation", "changed"),
    [
        (Augmentation(crop_scale=(0.2, 0.6)), lambda s: s.original_size[1] < SIZE[1]),
        (Augmentation(scale_jitter=0.5), lambda s: max(s.input_size) < 128),
        (Augmentation(rotate90=True), lambda s: s.original_size == SIZE[::-1]),
    ],
    ids=["crop_scale", "scale_jitter", "rotate90"],
)
def test_geometric_augmentation_keeps_masks_boxes_and_points_aligned(
    tmp_path: Path, augmentation: Augmentation, changed: Callable[[Sample], bool]
) -> None:
    dataset = DistillationDataset(
        rectangle_dataset(write_rectangle(tmp_path)), None, augmentation, 0
    )
    samples = []
    for epoch in range(6):
        dataset.set_epoch(epoch)
        item = dataset[0]
        assert_aligned(item.sample)
        assert item.teacher_image is None  # the teachers see the transformed image too
        samples.append(item.sample)
    assert any(changed(sample) for sample in samples)
    assert len({sample.original_size + sample.input_size for sample in samples}) > 1


def test_zoom_in_keeps_the_window_that_fills_the_input(tmp_path: Path) -> None:
    dataset = rectangle_dataset(write_rectangle(tmp_path))
    # At 1.25 x SAM's scale the image is 120 x 160: every row fits in 128, 128 / 1.25 columns.
    sample = dataset.sample(0, Geometry(zoom=1.25, zoom_at=(0.0, 0.5)))
    assert sample.original_size == (96, 102) and sample.input_size == (120, 128)
    assert_aligned(sample)
    assert sample.boxes[0].tolist() == [27, 30, 86, 59]  # 13 columns cut on the left


def test_objects_left_out_by_a_crop_are_dropped(tmp_path: Path) -> None:
    dataset = rectangle_dataset(write_rectangle(tmp_path))
    corner = dataset.sample(0, Geometry(area=0.04))  # the top-left 19 x 26 pixels
    assert corner.original_size == (19, 26)
    assert corner.masks.shape == (0, 19, 26) and corner.boxes.shape == (0, 4)
    assert corner.prompt_kinds == ()
    # Left without objects, a training image is an unlabelled one.
    crops = DistillationDataset(dataset, None, Augmentation(crop_scale=(0.04, 0.04)), 0)
    empty = []
    for epoch in range(8):
        crops.set_epoch(epoch)
        item = crops[0]
        if not item.sample.prompt_kinds:
            empty.append(item)
            assert item.low_res_targets.shape == (0, 32, 32)
    assert empty and collate_training(empty).num_targets() == 0


def test_geometry_off_leaves_samples_unchanged_and_is_seeded(tmp_path: Path) -> None:
    dataset = rectangle_dataset(write_rectangle(tmp_path))
    before = dataset[0]
    for unchanged in (
        dataset.sample(0, Geometry()),
        DistillationDataset(dataset, None, Augmentation(), 0)[0].sample,
    ):
        for name in ("image", "masks", "boxes", "prompt_boxes", "point_coords", "point_labels"):
            assert torch.equal(getattr(unchanged, name), getattr(before, name)), name
        assert unchanged.input_size == before.input_size
    everything = Augmentation(
        crop_scale=(0.3, 1.0), scale_jitter=0.3, rotate90=True, flip_probability=0.5
    )
    first, again = (DistillationDataset(dataset, None, everything, 5) for _ in range(2))
    for epoch in (0, 1):
        first.set_epoch(epoch)
        again.set_epoch(epoch)
        a, b = first[0], again[0]
        assert torch.equal(a.sample.image, b.sample.image)
        assert torch.equal(a.sample.masks, b.sample.masks)
        assert torch.equal(a.low_res_targets, b.low_res_targets)
    first.set_epoch(2)
    assert not torch.equal(first[0].sample.image, a.sample.image)


def test_geometry_needs_online_teachers(tmp_path: Path) -> None:
    dataset = rectangle_dataset(write_rectangle(tmp_path))
    store: Any = object()  # only whether there is one matters
    with pytest.raises(ValueError, match="geometric augmentation needs online teachers"):
        DistillationDataset(dataset, store, Augmentation(rotate90=True), 0)


def test_label_free_prompts_follow_the_geometry(tmp_path: Path) -> None:
    """An image without masks is prompted after the transform: the teacher's masks of the
    original image are transformed with it, grid points fall on the transformed image."""
    dataset = rectangle_dataset(write_rectangle(tmp_path, with_mask=False))
    mask = np.zeros((*SIZE, 1), dtype=np.uint8, order="F")
    mask[RECTANGLE] = 1
    rle = mask_utils.encode(mask)[0]
    masks = {"rect": [{"size": list(SIZE), "counts": rle["counts"].decode()}]}
    teacher = LabelFree("teacher_masks", pseudo_mask_weight=0.5, pseudo_masks=masks.__getitem__)
    augmentation = Augmentation(crop_scale=(0.4, 0.8), scale_jitter=0.3, rotate90=True)
    prompted = DistillationDataset(dataset, None, augmentation, 0, teacher)
    points = DistillationDataset(dataset, None, augmentation, 0, LabelFree("points", num_points=4))
    turned = []
    for epoch in range(4):
        prompted.set_epoch(epoch)
        item = prompted[0]
        assert_aligned(item.sample)
        assert item.task_weights is not None and item.task_weights.tolist() == [0.5]
        turned.append(item.sample.original_size[0] > item.sample.original_size[1])
        points.set_epoch(epoch)
        sample = points[0].sample
        assert sample.point_coords is not None and len(sample.point_coords) == 4
        height, width = sample.input_size
        assert (sample.point_coords[..., 0] < width).all()
        assert (sample.point_coords[..., 1] < height).all()
    assert any(turned)


def test_a_micro_batch_asks_for_its_feature_rows_together(
    shapes: Path, feature_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from samkd.features import FeatureStore

    dataset = build_dataset(shapes, image_size=256, prompts=PromptSampler(mode="box"))
    store = FeatureStore(feature_file, dtype=None)
    asked: list[list[int | str]] = []
    monkeypatch.setattr(store, "prefetch", asked.append)
    batches = DistillationDataset(dataset, store, Augmentation(), 0)
    batch = batches.__getitems__([3, 1])
    assert asked == [[dataset.records[3].image_id, dataset.records[1].image_id]]
    for item, index in zip(batch, [3, 1], strict=True):
        alone = batches[index]
        assert item.sample.image_id == alone.sample.image_id
        for tap, tensor in alone.teacher_features["t"].items():
            assert torch.equal(item.teacher_features["t"][tap], tensor)
