"""The dsb (Data Science Bowl folders) and labels (instance label images) layouts."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from samkd.data import DataError, LabelImage, build_dataset, detect_layout, read_layout

from .conftest import (
    IMAGE_SIZES,
    make_cellpose_dataset,
    make_dsb_dataset,
    make_folder_dataset,
    make_labels_dataset,
)
from .test_layouts import assert_masks_equal


def test_dsb_layout(tmp_path: Path) -> None:
    expected = make_dsb_dataset(tmp_path)
    dataset = build_dataset(tmp_path, layout="dsb", image_size=64)
    assert [record.image_id for record in dataset.records] == ["a", "b", "c"]
    assert_masks_equal(dataset, expected)


def test_labels_layout_one_object_per_id(tmp_path: Path) -> None:
    expected = make_labels_dataset(tmp_path)
    dataset = build_dataset(tmp_path, layout="labels", image_size=64)
    assert_masks_equal(dataset, expected)
    assert dataset[0].masks.shape[0] == 3  # ids 3, 7 and 300 of a 16-bit PNG


def test_labels_beside_images_with_cellpose_names(tmp_path: Path) -> None:
    expected = make_cellpose_dataset(tmp_path)
    dataset = build_dataset(tmp_path, layout="labels", image_size=64)
    assert [record.image_path.name for record in dataset.records] == ["a_img.png", "b.png", "c.png"]
    assert_masks_equal(dataset, expected)


@pytest.mark.parametrize(
    ("make", "layout"),
    [(make_dsb_dataset, "dsb"), (make_labels_dataset, "labels"), (make_cellpose_dataset, "labels")],
)
def test_auto_detection(tmp_path: Path, make, layout: str) -> None:
    make(tmp_path)
    assert detect_layout(tmp_path) == layout
    assert read_layout(tmp_path).layout == layout


@pytest.mark.parametrize(
    ("make", "layout", "expected"),
    [
        (make_folder_dataset, "dsb", "dsb layout expects <id>/images/<id>.png"),
        (make_dsb_dataset, "labels", "labels layout expects images/<id>.<ext>"),
    ],
)
def test_explicit_layout_that_does_not_match(tmp_path: Path, make, layout: str, expected) -> None:
    make(tmp_path)
    with pytest.raises(DataError) as info:
        build_dataset(tmp_path, layout=layout)
    assert str(info.value).startswith(f"{tmp_path}: ")
    assert expected in str(info.value)


def test_no_layout_message_names_the_new_layouts(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("nothing here")
    with pytest.raises(DataError, match=r"\(dsb layout\).*\(labels layout\)"):
        detect_layout(tmp_path)


def test_yolo_labels_are_not_label_images(tmp_path: Path) -> None:
    make_labels_dataset(tmp_path)
    shutil.rmtree(tmp_path / "labels")
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "a.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    with pytest.raises(DataError, match="no dataset layout recognised"):
        detect_layout(tmp_path)
    assert len(read_layout(tmp_path, layout="labels").records) == 3


def test_dsb_folder_without_its_image(tmp_path: Path) -> None:
    make_dsb_dataset(tmp_path)
    (tmp_path / "b" / "images" / "b.png").rename(tmp_path / "b" / "images" / "other.png")
    with pytest.raises(DataError, match=r"b/images: no image b\.<ext>"):
        read_layout(tmp_path, layout="dsb")
    index = read_layout(tmp_path, layout="dsb", on_error="skip")
    assert [record.image_id for record in index.records] == ["a", "c"]
    assert len(index.skipped) == 1


def test_label_image_without_image(tmp_path: Path) -> None:
    make_labels_dataset(tmp_path)
    shutil.copy(tmp_path / "labels" / "b.png", tmp_path / "labels" / "d.png")
    with pytest.raises(DataError, match=r"d\.png: label image has no image of id 'd'"):
        read_layout(tmp_path)
    assert len(read_layout(tmp_path, on_error="skip").records) == 3


@pytest.mark.parametrize(
    ("label", "problem"),
    [
        (np.zeros((10, 10), np.uint8), "label image is 10x10 (WxH) but its image is 60x40 (WxH)"),
        (np.zeros((40, 60, 3), np.uint8), "label image mode RGB is not supported"),
        (np.full((40, 60), 0.5, np.float32), "label image mode F is not supported"),
    ],
)
def test_unusable_label_image_is_one_line_error(tmp_path: Path, label, problem: str) -> None:
    make_labels_dataset(tmp_path)
    path = tmp_path / "labels" / "a.tif"
    (tmp_path / "labels" / "a.png").unlink()
    Image.fromarray(label).save(path)
    dataset = build_dataset(tmp_path, image_size=64)
    with pytest.raises(DataError) as info:
        dataset[0]
    assert str(info.value).startswith(f"{path}: {problem}")
    skipping = build_dataset(tmp_path, image_size=64, on_error="skip")
    assert skipping[0].masks.shape[0] == 0 and len(skipping[0].skipped) == 1


def test_validate_keeps_label_images_whole(tmp_path: Path) -> None:
    make_labels_dataset(tmp_path)
    dataset = build_dataset(tmp_path, image_size=64)
    assert dataset.validate() == []
    assert dataset.records[0].mask_sources == (LabelImage(tmp_path / "labels" / "a.png"),)
    assert dataset[0].masks.shape[0] == 3


def test_background_only_label_image_has_no_objects(tmp_path: Path) -> None:
    make_labels_dataset(tmp_path)
    Image.fromarray(np.zeros(IMAGE_SIZES["b"], np.uint8)).save(tmp_path / "labels" / "b.png")
    dataset = build_dataset(tmp_path, image_size=64)
    assert dataset[1].masks.shape == (0, *IMAGE_SIZES["b"])
    assert dataset.validate() == []
