"""SAM's supervised loss: 20 * focal + 1 * dice on the masks, plus MSE on the predicted IoU
(SAM's weights, the default of `train.task_loss_weights`).

As in SAM's training, an ambiguous prompt (a single point) is scored by the lowest-loss of
the three multimask outputs, and any other prompt (a box, several points) by the single-mask
output; the IoU head is trained on the outputs that are scored. With `other_outputs` w > 0, an
object scored by several outputs takes `(1 - w)` of its mask loss from the best and `w` from
the mean of the others (relaxed winner-takes-all, Rupprecht et al., ICCV 2017): with the best
alone, an output that loses the first few comparisons of a decoder trained from scratch is
never trained again.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from samkd.distill.precision import float32_loss


@dataclass(frozen=True)
class TaskLossWeights:
    """The weight of each task term in the loss; the focal and dice weights also rank the
    multimask outputs (an object is scored by its lowest-loss output)."""

    focal: float = 20.0
    dice: float = 1.0
    iou_mse: float = 1.0
    other_outputs: float = 0.0  # not a term: the share of the outputs besides the best

    def items(self) -> tuple[tuple[str, float], ...]:
        """(term, weight) pairs, in the order the terms are logged."""
        return (("focal", self.focal), ("dice", self.dice), ("iou_mse", self.iou_mse))

    def mask_loss(self, focal: torch.Tensor, dice: torch.Tensor) -> torch.Tensor:
        """The weighted mask terms of each output (any shape, the same for both)."""
        return self.focal * focal + self.dice * dice


SAM_TASK_WEIGHTS = TaskLossWeights()


@float32_loss
def sigmoid_focal_loss(
    logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0
) -> torch.Tensor:
    """Focal loss per mask, averaged over pixels.

    logits, targets: `N x M x H x W` (targets in {0, 1}). Returns `N x M`.
    FL = -alpha_t * (1 - p_t)^gamma * log(p_t), with p_t the probability of the true class.
    """
    probabilities = logits.sigmoid()
    cross_entropy = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_true = probabilities * targets + (1 - probabilities) * (1 - targets)
    alpha_true = alpha * targets + (1 - alpha) * (1 - targets)
    return (alpha_true * (1 - p_true) ** gamma * cross_entropy).flatten(2).mean(-1)


@float32_loss
def dice_loss(logits: torch.Tensor, targets: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 - (2 |P ∩ T| + s) / (|P| + |T| + s) on soft predictions. `N x M x H x W` -> `N x M`."""
    probabilities = logits.sigmoid().flatten(2)
    flat_targets = targets.flatten(2)
    intersection = (probabilities * flat_targets).sum(-1)
    total = probabilities.sum(-1) + flat_targets.sum(-1)
    return 1 - (2 * intersection + smooth) / (total + smooth)


@float32_loss
def binary_iou(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """IoU of the thresholded masks with the targets. `N x M x H x W` -> `N x M`."""
    predicted = (logits > 0).flatten(2)
    truth = targets.flatten(2) > 0.5
    intersection = (predicted & truth).sum(-1).float()
    union = (predicted | truth).sum(-1).float()
    return intersection / union.clamp(min=1)


@float32_loss
def sam_task_loss(
    mask_logits: torch.Tensor,
    iou_predictions: torch.Tensor,
    targets: torch.Tensor,
    ambiguous: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    term_weights: TaskLossWeights = SAM_TASK_WEIGHTS,
) -> dict[str, torch.Tensor]:
    """Focal, dice and IoU losses of N objects, each averaged over the objects.

    mask_logits: `N x M x h x w`; iou_predictions: `N x M`; targets: `N x h x w` in {0, 1}
    (ground truth at the logits' resolution). With SAM's four outputs (`M = 4`) and
    `ambiguous` (`N` bool), ambiguous objects use the best of outputs 1-3 and the others
    output 0; otherwise every object uses the best of its M outputs. With `weights` (`N`,
    >= 0), each loss is `sum(w_i * loss_i)` over the number of objects with `w_i > 0`.
    term_weights rank the outputs (`TaskLossWeights.mask_loss`) and give the share of the
    other scored outputs (`other_outputs`).
    Returns `{"focal", "dice", "iou_mse"}`, unweighted.
    """
    logits = mask_logits.float()
    expanded = targets[:, None].expand_as(logits).float()
    focal = sigmoid_focal_loss(logits, expanded)
    dice = dice_loss(logits, expanded)
    scored = torch.ones_like(focal, dtype=torch.bool)
    if ambiguous is not None:
        single = torch.zeros_like(scored)
        single[:, 0] = True
        scored = torch.where(ambiguous[:, None], ~single, single)
    combined = term_weights.mask_loss(focal, dice).masked_fill(~scored, float("inf"))
    best = combined.argmin(dim=1, keepdim=True)
    true_iou = binary_iou(logits.detach(), expanded)
    squared = (iou_predictions.float() - true_iou) ** 2
    iou_mse = (squared * scored).sum(dim=1) / scored.sum(dim=1)
    share = term_weights.other_outputs
    per_object = {
        "focal": relaxed_choice(focal, best, scored, share),
        "dice": relaxed_choice(dice, best, scored, share),
        "iou_mse": iou_mse,
    }
    if weights is None:
        return {name: values.mean() for name, values in per_object.items()}
    weights = weights.float()
    count = (weights > 0).sum().clamp_min(1)
    return {name: (weights * values).sum() / count for name, values in per_object.items()}


def relaxed_choice(
    values: torch.Tensor, best: torch.Tensor, scored: torch.Tensor, share: float
) -> torch.Tensor:
    """`N`: each object's value of its `best` output (`N x 1` indices), with `share` of it taken
    from the mean of its other `scored` outputs (`N x M` bool) where it has some."""
    chosen = values.gather(1, best)[:, 0]
    if share == 0:
        return chosen
    others = scored.scatter(1, best, False)
    count = others.sum(dim=1)
    mean_others = (values * others).sum(dim=1) / count.clamp_min(1)
    weight = torch.where(count > 0, share, 0.0)
    return (1 - weight) * chosen + weight * mean_others


def combine_task_losses(
    terms: Mapping[str, torch.Tensor], term_weights: TaskLossWeights = SAM_TASK_WEIGHTS
) -> torch.Tensor:
    """The weighted sum of the task terms (`sam_task_loss`'s), by default SAM's
    20 * focal + 1 * dice + 1 * iou_mse."""
    return term_weights.mask_loss(terms["focal"], terms["dice"]) + (
        term_weights.iou_mse * terms["iou_mse"]
    )
