from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from samkd.data import DataError, PngMask, build_dataset, detect_layout, read_layout
from samkd.data.masks import decode_rle_counts, rle_to_mask
from samkd.data.prompts import select_objects

from .conftest import (
    IMAGE_SIZES,
    make_coco_dataset,
    make_folder_dataset,
    make_sa1b_dataset,
    object_masks,
)


def assert_masks_equal(dataset, expected: dict[str, list[np.ndarray]]) -> None:
    assert sorted(r.image_id for r in dataset.records) == sorted(expected)
    for index in range(len(dataset)):
        sample = dataset[index]
        want = expected[sample.image_id]
        assert sample.masks.dtype == torch.bool
        assert sample.masks.shape == (len(want), *sample.original_size)
        for got, mask in zip(sample.masks.numpy(), want, strict=True):
            np.testing.assert_array_equal(got, mask)


def test_folder_layout(tmp_path: Path) -> None:
    expected = make_folder_dataset(tmp_path)
    dataset = build_dataset(tmp_path, layout="folder", image_size=64)
    assert len(dataset) == 3
    assert_masks_equal(dataset, expected)


def test_folder_masks_are_in_natural_order(tmp_path: Path) -> None:
    make_folder_dataset(tmp_path)
    for k in range(3, 11):
        shutil.copy(tmp_path / "mask" / "a" / "obj_0.png", tmp_path / "mask" / "a" / f"obj_{k}.png")
    index = read_layout(tmp_path)
    names = [
        source.path.name for source in index.records[0].mask_sources if isinstance(source, PngMask)
    ]
    assert names == [f"obj_{k}.png" for k in range(11)]


def test_coco_layout_polygon_and_rle(tmp_path: Path) -> None:
    expected = make_coco_dataset(tmp_path)
    dataset = build_dataset(tmp_path, layout="coco", image_size=64)
    assert_masks_equal(dataset, expected)


def test_coco_file_names_relative_to_image_dir(tmp_path: Path) -> None:
    images = tmp_path / "images"
    make_coco_dataset(images)
    annotations = tmp_path / "annotations"
    annotations.mkdir()
    shutil.move(images / "_annotations.coco.json", annotations / "instances.json")
    dataset = build_dataset(
        tmp_path, annotation_file=annotations / "instances.json", image_dir=images, image_size=64
    )
    assert len(dataset) == 3
    with pytest.raises(DataError, match="not found in"):
        build_dataset(tmp_path, annotation_file=annotations / "instances.json")


def test_sa1b_layout(tmp_path: Path) -> None:
    expected = make_sa1b_dataset(tmp_path)
    dataset = build_dataset(tmp_path, layout="sa1b", image_size=64)
    assert_masks_equal(dataset, expected)


@pytest.mark.parametrize(
    ("make", "layout"),
    [(make_folder_dataset, "folder"), (make_coco_dataset, "coco"), (make_sa1b_dataset, "sa1b")],
)
def test_auto_detection(tmp_path: Path, make, layout: str) -> None:
    make(tmp_path)
    assert detect_layout(tmp_path) == layout
    assert read_layout(tmp_path).layout == layout


def test_ambiguous_layout_names_folder_and_candidates(tmp_path: Path) -> None:
    make_folder_dataset(tmp_path)
    make_coco_dataset(tmp_path)
    with pytest.raises(DataError) as info:
        build_dataset(tmp_path)
    message = str(info.value)
    assert "\n" not in message
    assert str(tmp_path) in message
    assert "folder and coco" in message
    assert len(build_dataset(tmp_path, layout="folder")) == 3


def test_no_layout_says_what_was_looked_for(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("nothing here")
    with pytest.raises(DataError) as info:
        build_dataset(tmp_path)
    message = str(info.value)
    assert "\n" not in message
    assert str(tmp_path) in message
    assert "image/" in message and "COCO" in message and "<id>.json" in message


def test_several_coco_files_need_annotation_file(tmp_path: Path) -> None:
    make_coco_dataset(tmp_path)
    shutil.copy(tmp_path / "_annotations.coco.json", tmp_path / "other.json")
    with pytest.raises(DataError, match="several COCO annotation files"):
        build_dataset(tmp_path, layout="coco")
    dataset = build_dataset(tmp_path, annotation_file=tmp_path / "other.json")
    assert len(dataset) == 3


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="dataset folder not found"):
        build_dataset(tmp_path / "absent")


def test_compressed_rle_decoder_matches_pycocotools() -> None:
    from pycocotools import mask as coco_mask

    rng = np.random.default_rng(0)
    for _ in range(20):
        mask = rng.random((17, 23)) < rng.random()
        rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
        runs = decode_rle_counts(rle["counts"].decode("ascii"))
        np.testing.assert_array_equal(rle_to_mask(runs, 17, 23), mask)


def test_max_objects_caps_and_is_deterministic(tmp_path: Path) -> None:
    make_folder_dataset(tmp_path)
    dataset = build_dataset(tmp_path, max_objects=2, seed=3, image_size=64)
    sample = dataset[0]
    assert sample.image_id == "a" and sample.masks.shape[0] == 2
    chosen = select_objects(3, 2, seed=3, index=0)
    all_masks = object_masks(*IMAGE_SIZES["a"])
    for got, k in zip(sample.masks.numpy(), chosen, strict=True):
        np.testing.assert_array_equal(got, all_masks[k])
    np.testing.assert_array_equal(dataset[0].masks, sample.masks)
    assert dataset[1].masks.shape[0] == 1
