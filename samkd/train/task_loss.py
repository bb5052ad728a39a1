"""SAM's supervised loss: 20 * focal + 1 * dice on the masks, plus MSE on the predicted IoU.

With multimask output, each object's loss is that of its lowest-loss mask (SAM's recipe for
ambiguous prompts); the IoU head is trained on every mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FOCAL_WEIGHT = 20.0
DICE_WEIGHT = 1.0
IOU_WEIGHT = 1.0


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


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 - (2 |P ∩ T| + s) / (|P| + |T| + s) on soft predictions. `N x M x H x W` -> `N x M`."""
    probabilities = logits.sigmoid().flatten(2)
    flat_targets = targets.flatten(2)
    intersection = (probabilities * flat_targets).sum(-1)
    total = probabilities.sum(-1) + flat_targets.sum(-1)
    return 1 - (2 * intersection + smooth) / (total + smooth)


def binary_iou(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """IoU of the thresholded masks with the targets. `N x M x H x W` -> `N x M`."""
    predicted = (logits > 0).flatten(2)
    truth = targets.flatten(2) > 0.5
    intersection = (predicted & truth).sum(-1).float()
    union = (predicted | truth).sum(-1).float()
    return intersection / union.clamp(min=1)


def sam_task_loss(
    mask_logits: torch.Tensor, iou_predictions: torch.Tensor, targets: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Focal, dice and IoU losses of N objects, each averaged over the objects.

    mask_logits: `N x M x h x w`; iou_predictions: `N x M`; targets: `N x h x w` in {0, 1}
    (ground truth at the logits' resolution). Returns `{"focal", "dice", "iou_mse"}`.
    """
    logits = mask_logits.float()
    expanded = targets[:, None].expand_as(logits).float()
    focal = sigmoid_focal_loss(logits, expanded)
    dice = dice_loss(logits, expanded)
    best = (FOCAL_WEIGHT * focal + DICE_WEIGHT * dice).argmin(dim=1, keepdim=True)
    true_iou = binary_iou(logits.detach(), expanded)
    iou_mse = F.mse_loss(iou_predictions.float(), true_iou, reduction="none").mean(dim=1)
    return {
        "focal": focal.gather(1, best).mean(),
        "dice": dice.gather(1, best).mean(),
        "iou_mse": iou_mse.mean(),
    }


def combine_task_losses(terms: dict[str, torch.Tensor]) -> torch.Tensor:
    """20 * focal + 1 * dice + 1 * iou_mse."""
    return (
        FOCAL_WEIGHT * terms["focal"] + DICE_WEIGHT * terms["dice"] + IOU_WEIGHT * terms["iou_mse"]
    )
