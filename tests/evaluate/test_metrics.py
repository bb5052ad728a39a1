"""IoU and mIoU against values computed by hand."""

import pytest
import torch

from samkd.evaluate.metrics import IoUTable, mask_iou, size_bucket


def masks_from(rows: list[str]) -> torch.Tensor:
    return torch.tensor([[char == "#" for char in row] for row in rows])


def test_iou_of_small_masks_by_hand() -> None:
    predicted = masks_from(["##..", "##..", "....", "...."])  # 4 pixels
    target = masks_from([".##.", ".##.", ".##.", "...."])  # 6 pixels, 2 shared
    assert mask_iou(predicted, target).item() == pytest.approx(2 / 8)


def test_iou_identical_disjoint_and_empty() -> None:
    mask = masks_from(["#.", "##"])
    assert mask_iou(mask, mask).item() == 1.0
    assert mask_iou(mask, ~mask).item() == 0.0
    empty = torch.zeros(2, 2, dtype=torch.bool)
    assert mask_iou(empty, empty).item() == 1.0
    assert mask_iou(empty, mask).item() == 0.0


def test_iou_is_batched() -> None:
    first = masks_from(["##", ".."])
    second = masks_from(["#.", ".."])
    predicted = torch.stack([first, first])
    target = torch.stack([first, second])
    assert mask_iou(predicted, target).tolist() == [1.0, 0.5]


def test_size_buckets_follow_coco() -> None:
    assert size_bucket(32 * 32 - 1) == "small"
    assert size_bucket(32 * 32) == "medium"
    assert size_bucket(96 * 96 - 1) == "medium"
    assert size_bucket(96 * 96) == "large"


def test_table_means_by_group_and_size() -> None:
    table = IoUTable()
    table.add("box", "single", torch.tensor([1.0, 0.5]), torch.tensor([100, 5000]))
    table.add("box", "single", torch.tensor([0.0]), torch.tensor([20000]))
    table.add("point", "single", torch.tensor([0.25]), torch.tensor([100]))
    assert table.mean("box", "single") == pytest.approx(0.5)
    assert table.mean("box", "single", "small") == 1.0
    assert table.mean("box", "single", "medium") == 0.5
    assert table.mean("box", "single", "large") == 0.0
    assert table.mean("point", "single", "large") is None
    summary = table.summary()
    assert summary["box"]["single"]["count"] == 3
    assert summary["point"]["single"]["miou"] == 0.25
    assert table.groups() == [("box", "single"), ("point", "single")]
