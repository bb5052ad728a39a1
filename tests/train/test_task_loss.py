"""SAM's task loss against slow per-pixel references."""

import math

import pytest
import torch

from samkd.settings import SettingsError
from samkd.train import setup
from samkd.train.forward import DecoderOutputs
from samkd.train.step import task_terms
from samkd.train.task_loss import (
    SAM_TASK_WEIGHTS,
    TaskLossWeights,
    binary_iou,
    combine_task_losses,
    dice_loss,
    sam_task_loss,
    sigmoid_focal_loss,
)

from .conftest import make_settings


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


def random_outputs(seed: int = 0) -> DecoderOutputs:
    """Three objects, SAM's four outputs each, the first prompted by a single point."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 4, 8, 8, generator=generator) * 3
    iou = torch.rand(3, 4, generator=generator)
    return DecoderOutputs(logits, iou, torch.tensor([True, False, False]), None)


def random_targets(seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(3, 8, 8, generator=generator) > 0.5).float()


def test_task_total_is_the_weighted_sum_of_the_logged_terms() -> None:
    weights = TaskLossWeights(focal=2.0, dice=3.0, iou_mse=0.5)
    terms = task_terms(random_outputs(), random_targets(), None, weights)
    focal, dice, iou_mse = (terms[f"task/{name}"].item() for name in ("focal", "dice", "iou_mse"))
    assert terms["task/total"].item() == pytest.approx(2 * focal + 3 * dice + 0.5 * iou_mse)


def test_default_weights_are_sams() -> None:
    terms = task_terms(random_outputs(), random_targets(), None)
    by_hand = 20 * terms["task/focal"] + 1 * terms["task/dice"] + 1 * terms["task/iou_mse"]
    assert torch.equal(terms["task/total"], by_hand)
    settings = make_settings()
    assert setup.task_loss_weights(settings) == SAM_TASK_WEIGHTS
    schema = setup.build_schema(settings, None)
    task = {name: schema.weights[schema.index(f"task/{name}")] for name in ("focal", "dice")}
    assert task == {"focal": 20.0, "dice": 1.0}


def test_the_settings_weigh_the_back_propagated_terms() -> None:
    settings = make_settings("train.task_loss_weights={focal: 5, dice: 0, iou: 2.5}")
    schema = setup.build_schema(settings, None)
    weights = {name: schema.weights[schema.index(name)] for name in schema.names}
    assert weights == {
        "task/focal": 5.0,
        "task/dice": 0.0,
        "task/iou_mse": 2.5,
        "task/total": 0.0,  # derived: logged, not back-propagated
        "loss/total": 0.0,
    }
    assert schema.task_weights == TaskLossWeights(focal=5.0, dice=0.0, iou_mse=2.5)


def test_the_mask_weights_pick_the_scored_output() -> None:
    # Output 1 is confident with one wrong pixel (low dice, high focal); output 2 is timid
    # (right everywhere, but near 0.5: high dice, low focal).
    target = torch.zeros(1, 4, 4)
    target[0, :2] = 1
    confident = (target[0] * 2 - 1) * 20
    confident[3, 3] = 20
    timid = (target[0] * 2 - 1) * 0.5
    logits = torch.stack([confident, confident, timid, timid])[None]
    ious, ambiguous = torch.zeros(1, 4), torch.tensor([True])
    by_focal = sam_task_loss(logits, ious, target, ambiguous, term_weights=TaskLossWeights(1, 0))
    by_dice = sam_task_loss(logits, ious, target, ambiguous, term_weights=TaskLossWeights(0, 1))
    assert by_focal["focal"] < by_dice["focal"]
    assert by_dice["dice"] < by_focal["dice"]


def test_other_outputs_take_their_share_of_a_single_click_only() -> None:
    outputs, targets = random_outputs(), random_targets()
    logits = outputs.mask_logits.float()
    expanded = targets[:, None].expand_as(logits)
    focal = sigmoid_focal_loss(logits, expanded)
    share = 0.2
    weights = TaskLossWeights(other_outputs=share)
    terms = sam_task_loss(logits, outputs.iou, targets, outputs.ambiguous, term_weights=weights)
    pure = sam_task_loss(logits, outputs.iou, targets, outputs.ambiguous)
    # Object 0 (a single click): best of outputs 1-3 plus `share` of the other two's mean;
    # objects 1 and 2 (boxes): output 0 alone, as without the share.
    click = focal[0, 1:]
    best = int((20 * click + dice_loss(logits, expanded)[0, 1:]).argmin())
    others = [value for index, value in enumerate(click.tolist()) if index != best]
    relaxed = (1 - share) * click[best].item() + share * sum(others) / 2
    expected = (relaxed + focal[1, 0].item() + focal[2, 0].item()) / 3
    assert terms["focal"].item() == pytest.approx(expected, rel=1e-5)
    assert terms["iou_mse"].item() == pytest.approx(pure["iou_mse"].item())
    assert not torch.allclose(terms["focal"], pure["focal"])


def test_other_outputs_keep_every_multimask_output_trained() -> None:
    outputs, targets = random_outputs(), random_targets()
    for share, trained in ((0.0, 1), (0.1, 3)):
        logits = outputs.mask_logits.clone().requires_grad_()
        weights = TaskLossWeights(other_outputs=share)
        terms = sam_task_loss(logits, outputs.iou, targets, outputs.ambiguous, term_weights=weights)
        combine_task_losses(terms, weights).backward()
        assert logits.grad is not None
        reached = (logits.grad[0, 1:].flatten(1).abs().sum(dim=1) > 0).sum().item()
        assert reached == trained


@pytest.mark.parametrize(
    ("assignment", "message"),
    [
        ("train.task_loss_weights.focal=-1", "train.task_loss_weights.focal: Input should be"),
        ("train.task_loss_weights={focal: 0, dice: 0, iou: 0}", "every weight is 0"),
        ("train.task_loss_weights.mse=1", "unknown key 'train.task_loss_weights.mse'"),
        ("train.task_loss_weights.other_outputs=1", "other_outputs: Input should be less than 1"),
    ],
)
def test_bad_task_weights_are_refused_in_one_line(assignment: str, message: str) -> None:
    with pytest.raises(SettingsError, match=message) as error:
        make_settings(assignment)
    assert "\n" not in str(error.value)
