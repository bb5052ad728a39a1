"""Learnable adapters that map a student feature onto its teacher's channels and grid.

One adapter per matched pair, built from declared or probed shapes before the optimizer is
built. They train with the student and are saved in training checkpoints, but they are not part
of the student: they live in the objective, never inside the Sam model, so exported student
weights leave them out.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from samkd.models.attention_capture import AttentionCapture
from samkd.settings import TapPair

FeatureShape = tuple[int, int, int]


class FeatureAdapter(nn.Module):
    """`a(f) = resize(W f + b)`: a 1x1 conv to the teacher's channels (when they differ) and a
    bilinear resize to the teacher's grid (when it differs).

    Both are linear per position and per channel, so they commute; the conv runs on whichever
    grid is smaller.

    Input `B x C_s x H_s x W_s`, output `B x C_t x H_t x W_t`.
    """

    def __init__(self, student_shape: Sequence[int], teacher_shape: Sequence[int]) -> None:
        super().__init__()
        student_channels, *student_size = student_shape
        teacher_channels, *teacher_size = teacher_shape
        self.student_shape = tuple(student_shape)
        self.teacher_size = tuple(teacher_size)
        self.project: nn.Module = (
            nn.Identity()
            if student_channels == teacher_channels
            else nn.Conv2d(student_channels, teacher_channels, kernel_size=1)
        )
        self.project_first = student_size[0] * student_size[1] <= teacher_size[0] * teacher_size[1]

    def resize(self, features: torch.Tensor) -> torch.Tensor:
        if tuple(features.shape[-2:]) == self.teacher_size:
            return features
        return F.interpolate(features, size=self.teacher_size, mode="bilinear", align_corners=False)

    def forward(self, student_features: torch.Tensor) -> torch.Tensor:
        if tuple(student_features.shape[1:]) != self.student_shape:
            raise ValueError(
                f"adapter built for student features {self.student_shape}, got "
                f"{tuple(student_features.shape[1:])}"
            )
        if self.project_first:
            return self.resize(self.project(student_features))
        return self.project(self.resize(student_features))


def build_adapter(student_shape: Sequence[int], teacher_shape: Sequence[int]) -> nn.Module:
    """`nn.Identity` when the `C x H x W` shapes already match, else a `FeatureAdapter`."""
    if len(student_shape) != 3 or len(teacher_shape) != 3:
        raise ValueError(
            f"adapters map C x H x W features, got {tuple(student_shape)} -> {tuple(teacher_shape)}"
        )
    if tuple(student_shape) == tuple(teacher_shape):
        return nn.Identity()
    return FeatureAdapter(student_shape, teacher_shape)


def adapter_key(pair: TapPair) -> str:
    """Module name of a pair's adapter (`encoder.block.9` -> `encoder.block.31` gives
    `encoder_block_9__encoder_block_31`; module names cannot hold dots)."""
    return f"{pair.student.replace('.', '_')}__{pair.teacher.replace('.', '_')}"


def build_adapters(
    pairs: Iterable[TapPair],
    student_shapes: Mapping[str, Sequence[int]],
    teacher_shapes: Mapping[str, Sequence[int]],
) -> nn.ModuleDict:
    """One adapter per matched pair, keyed by `adapter_key(pair)`.

    Args:
        pairs: matched (student tap, teacher tap) pairs.
        student_shapes: `C x H x W` (no batch) of each student tap.
        teacher_shapes: `C x H x W` (no batch) of each teacher tap.
    """
    adapters = nn.ModuleDict()
    for pair in pairs:
        if pair.student not in student_shapes:
            raise KeyError(f"no declared or probed shape for student tap '{pair.student}'")
        if pair.teacher not in teacher_shapes:
            raise KeyError(f"no declared or probed shape for teacher tap '{pair.teacher}'")
        adapters[adapter_key(pair)] = build_adapter(
            student_shapes[pair.student], teacher_shapes[pair.teacher]
        )
    return adapters


def feature_shapes(
    features: Mapping[str, torch.Tensor | AttentionCapture],
) -> dict[str, tuple[int, ...]]:
    """Per-tap shape without the batch dimension, e.g. from one probe forward pass (attention
    captures have no feature shape and are left out)."""
    return {
        name: tuple(feature.shape[1:])
        for name, feature in features.items()
        if isinstance(feature, torch.Tensor)
    }
