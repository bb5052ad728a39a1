from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from samkd.data import DataError, SegmentationDataset, build_dataset, summarize_skipped

from .conftest import make_coco_dataset, make_folder_dataset, make_sa1b_dataset, write_mask_png


def load_all(dataset: SegmentationDataset) -> list[str]:
    """Load every sample; return the load-time skip messages."""
    return [message for index in range(len(dataset)) for message in dataset[index].skipped]


def edit_coco(root: Path, edit: Callable[[dict], None]) -> Path:
    path = root / "_annotations.coco.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    return path


def unreadable_image(root: Path) -> Path:
    make_folder_dataset(root)
    (root / "image" / "b.png").write_bytes(b"not an image at all")
    return root / "image" / "b.png"


def truncated_image(root: Path) -> Path:
    make_coco_dataset(root)
    path = root / "b.jpg"
    path.write_bytes(path.read_bytes()[:300])
    return path


def mask_size_mismatch(root: Path) -> Path:
    make_folder_dataset(root)
    path = root / "mask" / "a" / "obj_1.png"
    write_mask_png(path, np.ones((10, 10), bool))
    return path


def rle_size_mismatch(root: Path) -> Path:
    make_sa1b_dataset(root)
    path = root / "sa_2.json"
    data = json.loads(path.read_text())
    data["annotations"][0]["segmentation"] = {"size": [2, 3], "counts": [1, 5]}
    path.write_text(json.dumps(data))
    return path


def coco_image_size_mismatch(root: Path) -> Path:
    make_coco_dataset(root)
    edit_coco(root, lambda data: data["images"][2].update(width=99))
    return root / "c.jpg"


def empty_mask(root: Path) -> Path:
    make_folder_dataset(root)
    path = root / "mask" / "b" / "obj_0.png"
    write_mask_png(path, np.zeros((50, 30), bool))
    return path


def empty_polygon(root: Path) -> Path:
    make_coco_dataset(root)
    line = [[1.0, 1.0, 5.0, 1.0, 9.0, 1.0]]
    return edit_coco(root, lambda data: data["annotations"][0].update(segmentation=line))


def missing_coco_image(root: Path) -> Path:
    make_coco_dataset(root)
    (root / "b.jpg").unlink()
    return root / "_annotations.coco.json"


def mask_folder_without_image(root: Path) -> Path:
    make_folder_dataset(root)
    write_mask_png(root / "mask" / "zz" / "obj_0.png", np.ones((4, 4), bool))
    return root / "mask" / "zz"


def sa1b_json_without_image(root: Path) -> Path:
    make_sa1b_dataset(root)
    (root / "sa_1.jpg").unlink()
    return root / "sa_1.json"


def bad_compressed_rle(root: Path) -> Path:
    make_coco_dataset(root)
    rle = {"size": [40, 60], "counts": "zz~~\x01"}
    return edit_coco(root, lambda data: data["annotations"][1].update(segmentation=rle))


def bad_uncompressed_rle(root: Path) -> Path:
    make_coco_dataset(root)
    rle = {"size": [40, 60], "counts": [5, 7]}
    return edit_coco(root, lambda data: data["annotations"][2].update(segmentation=rle))


def bad_polygon(root: Path) -> Path:
    make_coco_dataset(root)
    return edit_coco(root, lambda data: data["annotations"][0].update(segmentation=[[1, 2, 3]]))


def annotation_of_unknown_image(root: Path) -> Path:
    make_coco_dataset(root)
    return edit_coco(root, lambda data: data["annotations"][3].update(image_id=42))


def malformed_sa1b_json(root: Path) -> Path:
    make_sa1b_dataset(root)
    (root / "sa_2.json").write_text('{"annotations": [')
    return root / "sa_2.json"


BAD_INPUTS = [
    (unreadable_image, "folder"),
    (truncated_image, "coco"),
    (mask_size_mismatch, "folder"),
    (rle_size_mismatch, "sa1b"),
    (coco_image_size_mismatch, "coco"),
    (empty_mask, "folder"),
    (empty_polygon, "coco"),
    (missing_coco_image, "coco"),
    (mask_folder_without_image, "folder"),
    # Auto-detection would call this folder ambiguous: the orphan JSON also looks like COCO.
    (sa1b_json_without_image, "sa1b"),
    (bad_compressed_rle, "coco"),
    (bad_uncompressed_rle, "coco"),
    (bad_polygon, "coco"),
    (annotation_of_unknown_image, "coco"),
    (malformed_sa1b_json, "sa1b"),
]
IDS = [corrupt.__name__ for corrupt, _ in BAD_INPUTS]


@pytest.mark.parametrize(("corrupt", "layout"), BAD_INPUTS, ids=IDS)
def test_bad_input_raises_one_line_naming_the_file(tmp_path: Path, corrupt, layout) -> None:
    bad_file = corrupt(tmp_path)
    with pytest.raises(DataError) as info:
        load_all(build_dataset(tmp_path, layout=layout, image_size=32))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{bad_file}: ")
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(("corrupt", "layout"), BAD_INPUTS, ids=IDS)
def test_skip_mode_leaves_out_and_counts(tmp_path: Path, corrupt, layout) -> None:
    bad_file = corrupt(tmp_path)
    dataset = build_dataset(tmp_path, layout=layout, image_size=32, on_error="skip")
    messages = dataset.skipped + load_all(dataset)
    assert len(set(messages)) == 1
    assert messages[0].startswith(f"{bad_file}: ")
    assert summarize_skipped(messages).startswith("skipped 1 item;")


def test_malformed_coco_json_always_raises(tmp_path: Path) -> None:
    make_coco_dataset(tmp_path)
    path = tmp_path / "_annotations.coco.json"
    path.write_text('{"images": [}')
    for on_error in ("raise", "skip"):
        with pytest.raises(DataError) as info:
            build_dataset(tmp_path, on_error=on_error)
        assert str(info.value).startswith(f"{path}: malformed JSON at line 1")


def test_bad_image_is_replaced_by_the_next_one(tmp_path: Path) -> None:
    unreadable_image(tmp_path)
    dataset = build_dataset(tmp_path, image_size=32, on_error="skip")
    sample = dataset[1]
    assert sample.index == 2 and sample.image_id == "c"
    assert len(sample.skipped) == 1 and "b.png" in sample.skipped[0]


def test_validate_removes_bad_items_once(tmp_path: Path) -> None:
    make_folder_dataset(tmp_path)
    (tmp_path / "image" / "c.png").write_bytes(b"broken")
    write_mask_png(tmp_path / "mask" / "a" / "obj_1.png", np.zeros((40, 60), bool))
    dataset = build_dataset(tmp_path, image_size=32, on_error="skip")
    found = dataset.validate()
    assert len(found) == 2 and dataset.skipped == found
    assert len(dataset) == 2
    assert load_all(dataset) == []
    assert dataset[0].masks.shape[0] == 2
    assert summarize_skipped(dataset.skipped).startswith("skipped 2 items;")


def test_validate_raises_under_raise(tmp_path: Path) -> None:
    empty_mask(tmp_path)
    with pytest.raises(DataError, match="mask is empty"):
        build_dataset(tmp_path).validate()


def test_unknown_on_error(tmp_path: Path) -> None:
    make_folder_dataset(tmp_path)
    with pytest.raises(ValueError, match="on_error"):
        build_dataset(tmp_path, on_error="ignore")  # type: ignore[arg-type]
