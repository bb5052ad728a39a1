"""One training forward: student, task loss and distillation objective, as one module.

Wrapping the student and the objective's adapters in one `nn.Module` lets
DistributedDataParallel synchronise both with a single call of `forward`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from segment_anything.modeling import Sam
from torch import nn

from samkd.distill import DistillationObjective
from samkd.models import AttentionCapture
from samkd.train.forward import (
    UPSCALED_TAP,
    PromptGroup,
    decoder_features,
    encoder_forward,
    run_decoder,
)
from samkd.train.task_loss import combine_task_losses, sam_task_loss
from samkd.train.teachers import split_taps


class DistillationStep(nn.Module):
    """Loss of one micro-batch: SAM's task loss (when there are masks) plus distillation.

    Returns the total loss and a flat dict of detached terms: `task/focal`, `task/dice`,
    `task/iou_mse`, `task/total`, every `kd/<teacher>/<term>`, `kd/lambda`, `loss/total`.
    """

    def __init__(
        self, student: Sam, objective: DistillationObjective | None, task_loss: bool = True
    ) -> None:
        super().__init__()
        self.student = student
        self.objective = objective
        self.task_loss = task_loss
        taps = objective.required_student_taps() if objective is not None else []
        self.encoder_taps, self.decoder_taps = split_taps(taps)

    def forward(
        self,
        images: torch.Tensor,
        groups: Sequence[PromptGroup],
        targets: torch.Tensor | None,
        teachers: Mapping[str, Mapping[str, torch.Tensor | AttentionCapture]],
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        embeddings, student_features = encoder_forward(self.student, images, self.encoder_taps)
        terms: dict[str, torch.Tensor] = {}
        losses: list[torch.Tensor] = []
        if groups:
            decoded = run_decoder(
                self.student.prompt_encoder,
                self.student.mask_decoder,
                embeddings,
                groups,
                record_upscaled=UPSCALED_TAP in self.decoder_taps,
            )
            student_features.update(decoder_features(decoded, self.decoder_taps))
            if targets is not None and self.task_loss:
                task = sam_task_loss(decoded.mask_logits, decoded.iou, targets, decoded.ambiguous)
                task_total = combine_task_losses(task)
                terms.update({f"task/{name}": value.detach() for name, value in task.items()})
                terms["task/total"] = task_total.detach()
                losses.append(task_total)
        if self.objective is not None:
            output = self.objective(student_features, teachers)
            terms.update(output.terms)
            losses.append(output.total)
        total = torch.stack(losses).sum() if losses else embeddings.sum() * 0
        terms["loss/total"] = total.detach()
        return total, terms
