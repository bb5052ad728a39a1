"""Decoder matching: the upscaled mask embedding and the mask logits, same prompts to both."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from samkd.distill.encoder import check_same_shape
from samkd.distill.precision import float32_loss


@float32_loss
def cosine_distance(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """`mean_{b,y,x} (1 - cos(s[b, :, y, x], t[b, :, y, x]))`: cosine over channels.

    Args:
        student: `B x C x H x W` (e.g. `decoder.upscaled`, `B x 32 x 4h x 4w`).
        teacher: same shape.

    Returns:
        A scalar in `[0, 2]`.
    """
    check_same_shape(student, teacher, "cosine_distance")
    similarity = F.cosine_similarity(student, teacher, dim=1, eps=1e-8)
    return (1.0 - similarity).mean()


@float32_loss
def mask_logit_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Temperature-scaled KL between per-pixel Bernoulli distributions of mask logits.

    With `p = sigmoid(z / tau)` per pixel,
    `tau^2 * mean_pixels [p_t log(p_t / p_s) + (1 - p_t) log((1 - p_t) / (1 - p_s))]`,
    computed from log-sigmoids so that saturated logits stay finite.

    Args:
        student_logits: `B x M x H x W` (M masks per prompt).
        teacher_logits: same shape.
        temperature: `tau > 0`.

    Returns:
        A scalar.
    """
    check_same_shape(student_logits, teacher_logits, "mask_logit_kl")
    student_scaled = student_logits / temperature
    teacher_scaled = teacher_logits / temperature
    teacher_prob = torch.sigmoid(teacher_scaled)
    kl_positive = teacher_prob * (F.logsigmoid(teacher_scaled) - F.logsigmoid(student_scaled))
    kl_negative = (1.0 - teacher_prob) * (
        F.logsigmoid(-teacher_scaled) - F.logsigmoid(-student_scaled)
    )
    return (kl_positive + kl_negative).mean() * temperature**2
