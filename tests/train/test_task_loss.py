"""SAM's task loss against slow per-pixel references."""

import math

import pytest
import torch

from samkd.train.task_loss import (
    binary_iou,
    combine_task_losses,
    dice_loss,
    sam_task_loss,
    sigmoid_focal_loss,
)


def test_focal_matches_per_pixel_formula() -> None:
    logits = torch.tensor([[[[2.0, -1.0], [0.5, -3.0]]]])
    targets = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    total = 0.0
    for logit, target in zip(logits.flatten().tolist(), targets.flatten().tolist(), strict=True):
        p = 1 / (1 + math.exp(-logit))
        p_true = p if target else 1 - p
        alpha = 0.25 if target else 0.75
        total += -alpha * (1 - p_true) ** 2 * math.log(p_true)
    assert sigmoid_focal_loss(logits, targets).item() == pytest.approx(total / 4, rel=1e-5)


def test_dice_is_zero_for_confident_perfect_masks() -> None:
    targets = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    logits = (targets * 2 - 1) * 50
    assert dice_loss(logits, targets).item() == pytest.approx(0.0, abs=1e-6)
    assert binary_iou(logits, targets).item() == 1.0


def test_multimask_picks_lowest_loss_mask() -> None:
    target = torch.zeros(1, 4, 4)
    target[0, :2] = 1
    good = (target * 2 - 1) * 20
    bad = -good
    logits = torch.stack([bad[0], good[0], bad[0]])[None]
    terms = sam_task_loss(logits, torch.tensor([[0.0, 1.0, 0.0]]), target)
    assert terms["dice"].item() == pytest.approx(0.0, abs=1e-4)
    assert terms["iou_mse"].item() == pytest.approx(0.0, abs=1e-6)
    single = sam_task_loss(bad[None], torch.tensor([[0.0]]), target)
    assert combine_task_losses(single) > combine_task_losses(terms)


def test_single_output_for_boxes_and_multimask_for_single_points() -> None:
    target = torch.zeros(2, 4, 4)
    target[:, :2] = 1
    good = (target[0] * 2 - 1) * 20
    bad = -good
    # output 0 is bad and output 2 good, for both objects
    logits = torch.stack([torch.stack([bad, bad, good, bad])] * 2)
    ious = torch.zeros(2, 4)
    ambiguous = torch.tensor([True, False])
    terms = sam_task_loss(logits, ious, target, ambiguous)
    only_ambiguous = sam_task_loss(logits[:1], ious[:1], target[:1], ambiguous[:1])
    only_box = sam_task_loss(logits[1:], ious[1:], target[1:], ambiguous[1:])
    assert only_ambiguous["dice"].item() == pytest.approx(0.0, abs=1e-4)  # picked output 2
    assert only_box["dice"].item() > 0.9  # held to output 0
    assert terms["dice"].item() == pytest.approx(
        (only_ambiguous["dice"].item() + only_box["dice"].item()) / 2
    )
