"""Encoder matching: MSE and temperature-scaled KL between matched feature maps.

Both functions take the adapted student feature and the teacher feature of one matched pair,
already on the same `B x C x H x W` layout (see `samkd.distill.adapters`).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from samkd.distill.precision import float32_loss

KLAxis = Literal["spatial", "channel"]


def check_same_shape(student: torch.Tensor, teacher: torch.Tensor, what: str) -> None:
    """Raise a ValueError naming `what` when the two features do not line up exactly."""
    if student.shape != teacher.shape:
        raise ValueError(
            f"{what}: student shape {tuple(student.shape)} does not match teacher shape "
            f"{tuple(teacher.shape)}; declare an adapter or matching taps"
        )


@float32_loss
def feature_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared error, `mean((s - t)^2)` over every element.

    Args:
        student: any shape, e.g. `B x C x H x W`.
        teacher: same shape as `student`.

    Returns:
        A scalar.
    """
    check_same_shape(student, teacher, "feature_mse")
    return F.mse_loss(student, teacher)


@float32_loss
def encoder_kl(
    student: torch.Tensor,
    teacher: torch.Tensor,
    temperature: float = 1.0,
    axis: KLAxis = "spatial",
) -> torch.Tensor:
    """Temperature-scaled KL between softmax distributions of two feature maps.

    `tau^2 * mean_d KL(p_t^d || p_s^d)`, with `p^d = softmax(f^d / tau)` and `KL(p || q) =
    sum_x p(x) log(p(x) / q(x))`.

    - `axis="spatial"` (channel-wise distillation, Shu et al. 2021): each of the `B * C`
      channels is a distribution over its `H * W` positions; the KL is averaged over them.
    - `axis="channel"`: each of the `B * H * W` positions is a distribution over its `C`
      channels; the KL is averaged over positions.

    Args:
        student: `B x C x H x W`, the adapted student feature.
        teacher: `B x C x H x W`.
        temperature: `tau > 0`.
        axis: which axis the softmax runs over.

    Returns:
        A scalar.
    """
    check_same_shape(student, teacher, "encoder_kl")
    if student.dim() != 4:
        raise ValueError(f"encoder_kl expects B x C x H x W features, got {student.dim()} dims")
    dim = -1 if axis == "spatial" else 1
    student_log_prob = F.log_softmax(student.flatten(2) / temperature, dim=dim)
    teacher_log_prob = F.log_softmax(teacher.flatten(2) / temperature, dim=dim)
    kl = (teacher_log_prob.exp() * (teacher_log_prob - student_log_prob)).sum(dim)
    return kl.mean() * temperature**2
