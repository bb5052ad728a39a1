"""IoU, Dice, boundary IoU and their means against values computed by hand."""

import numpy as np
import pytest
import torch

from samkd.evaluate.metrics import (
    IoUTable,
    boundary_iou,
    boundary_width,
    dice_score,
    mask_boundary,
    mask_iou,
    size_bucket,
)


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


def square(size: int, top: int, left: int, side: int) -> torch.Tensor:
    """`size x size` bool mask of a `side x side` square at (`top`, `left`)."""
    mask = torch.zeros(size, size, dtype=torch.bool)
    mask[top : top + side, left : left + side] = True
    return mask


def test_dice_by_hand() -> None:
    predicted = masks_from(["##..", "##..", "....", "...."])  # 4 pixels
    target = masks_from([".##.", ".##.", ".##.", "...."])  # 6 pixels, 2 shared
    assert dice_score(predicted, target).item() == pytest.approx(2 * 2 / (4 + 6))
    empty = torch.zeros(4, 4, dtype=torch.bool)
    assert dice_score(empty, empty).item() == 1.0
    assert dice_score(empty, target).item() == 0.0


def test_boundary_width_is_two_percent_of_the_diagonal() -> None:
    assert boundary_width(10, 10) == 1  # 0.28 rounds to 0, kept at 1
    assert boundary_width(100, 100) == 3  # 2.83
    assert boundary_width(768, 1024) == 26  # 0.02 * 1280 = 25.6
    assert boundary_width(768, 1024, dilation_ratio=0.01) == 13


def test_boundary_is_the_band_inside_the_contour() -> None:
    mask = square(10, 2, 2, 6)
    band = mask_boundary(mask, 1)
    assert band.sum().item() == 6 * 6 - 4 * 4
    assert not (band & ~mask).any()  # G_d intersected with G: nothing outside the mask
    assert not band[3:7, 3:7].any()
    assert mask_boundary(mask, 3).equal(mask)  # every pixel is within 3 of the contour


def test_boundary_iou_of_a_shifted_square_by_hand() -> None:
    # 6 x 6 squares one pixel apart in a 10 x 10 image, d = 1: each band is the 20-pixel
    # ring; the rings share the top and bottom rows of the overlap (2 x 5 pixels) and none
    # of the sides (columns 7 and 3), so boundary IoU = 10 / (20 + 20 - 10) = 1/3. Bands
    # that also took the pixels outside each mask, or mask IoU (30 / 42), give other values.
    target = square(10, 2, 2, 6)
    predicted = square(10, 2, 3, 6)
    assert boundary_iou(predicted, target).item() == pytest.approx(1 / 3)
    assert mask_iou(predicted, target).item() == pytest.approx(30 / 42)
    assert dice_score(predicted, target).item() == pytest.approx(60 / 72)


def test_boundary_iou_uses_the_image_diagonal() -> None:
    # 40 x 40 squares 10 pixels apart in a 100 x 100 image: d = 3, bands of 40^2 - 34^2 = 444
    # pixels sharing 2 x 3 rows of the 30 overlapping columns: 180 / (888 - 180) = 15/59.
    # d = 1 or 2 would give 60/252 or 120/488.
    target = square(100, 20, 20, 40)
    predicted = square(100, 20, 30, 40)
    assert boundary_iou(predicted, target).item() == pytest.approx(15 / 59)
    # A ratio of 0.015 gives d = round(2.12) = 2.
    thinner = boundary_iou(predicted, target, dilation_ratio=0.015)
    assert thinner.item() == pytest.approx(120 / 488)


def test_image_border_is_contour() -> None:
    # Top 5 rows vs top 4 rows of a 10 x 10 image, d = 1. Bands: row 0, the last row and the
    # side columns between them: 26 and 24 pixels, sharing row 0 (10), the sides of rows
    # 1-2 (4) and of row 3 (2): 16 / 34. Ignoring the border would give 0.
    target = torch.zeros(10, 10, dtype=torch.bool)
    target[:5] = True
    predicted = torch.zeros(10, 10, dtype=torch.bool)
    predicted[:4] = True
    assert mask_boundary(target, 1).sum().item() == 26
    assert boundary_iou(predicted, target).item() == pytest.approx(16 / 34)


def reference_boundary(mask: np.ndarray, dilation_ratio: float = 0.02) -> np.ndarray:
    """`mask_to_boundary` of the Boundary IoU reference code, with cv2.erode written out:
    zero-pad by one pixel, erode d times with a 3 x 3 square (the outside of the padded
    image never erodes, cv2's default border), subtract."""
    height, width = mask.shape
    distance = max(1, int(round(dilation_ratio * np.sqrt(height**2 + width**2))))
    eroded = np.pad(mask, 1)
    for _ in range(distance):
        framed = np.pad(eroded, 1, constant_values=True)
        shifts = [
            framed[1 + dy : 1 + dy + height + 2, 1 + dx : 1 + dx + width + 2]
            for dy in (-1, 0, 1)
            for dx in (-1, 0, 1)
        ]
        eroded = np.logical_and.reduce(shifts)
    return mask & ~eroded[1 : height + 1, 1 : width + 1]


def test_boundary_matches_the_reference_implementation() -> None:
    generator = torch.Generator().manual_seed(0)
    # Blobs: random low-resolution noise upsampled, so masks have holes and touch borders.
    noise = torch.rand(6, 1, 10, 14, generator=generator)
    masks = torch.nn.functional.interpolate(noise, size=(90, 130), mode="bilinear")[:, 0] > 0.5
    distance = boundary_width(90, 130)
    bands = mask_boundary(masks, distance)
    for mask, band in zip(masks, bands, strict=True):
        np.testing.assert_array_equal(band.numpy(), reference_boundary(mask.numpy()))
    expected = [
        (reference_boundary(a.numpy()) & reference_boundary(b.numpy())).sum()
        / (reference_boundary(a.numpy()) | reference_boundary(b.numpy())).sum()
        for a, b in zip(masks[:3], masks[3:], strict=True)
    ]
    assert boundary_iou(masks[:3], masks[3:]).tolist() == pytest.approx(expected)


def test_boundary_of_batches_and_empty_masks() -> None:
    masks = square(12, 1, 1, 8).expand(2, 3, 12, 12)
    assert mask_boundary(masks, 1).shape == (2, 3, 12, 12)
    assert mask_boundary(torch.zeros(0, 12, 12, dtype=torch.bool), 1).shape == (0, 12, 12)
    empty = torch.zeros(12, 12, dtype=torch.bool)
    assert boundary_iou(empty, empty).item() == 1.0
    assert boundary_iou(empty, square(12, 1, 1, 8)).item() == 0.0


def test_image_miou_averages_images_not_objects() -> None:
    table = IoUTable()
    table.add("box", "single", torch.tensor([1.0, 0.0, 0.5]), torch.tensor([10, 10, 10]))
    table.add("box", "single", torch.tensor([1.0]), torch.tensor([10]))
    assert table.mean("box", "single") == pytest.approx(2.5 / 4)
    assert table.metric_mean("image_miou", "box", "single") == pytest.approx((0.5 + 1.0) / 2)
    assert table.metric_mean("dice", "box", "single") is None


def test_table_scores_masks_with_every_metric() -> None:
    target = square(10, 2, 2, 6)
    predicted = square(10, 2, 3, 6)
    table = IoUTable()
    table.add_masks("box", "single", predicted[None], target[None], torch.tensor([36]))
    table.add_masks("box", "single", target[None], target[None], torch.tensor([36]))
    entry = table.summary()["box"]["single"]
    assert entry["miou"] == pytest.approx((30 / 42 + 1) / 2)
    assert entry["image_miou"] == pytest.approx((30 / 42 + 1) / 2)
    assert entry["dice"] == pytest.approx((60 / 72 + 1) / 2)
    assert entry["boundary_iou"] == pytest.approx((1 / 3 + 1) / 2)
    assert entry["count"] == 2
