"""AdamW without decay on 1-D parameters, and a cosine schedule with linear warmup."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn


def parameter_groups(modules: Iterable[nn.Module], weight_decay: float) -> list[dict[str, object]]:
    """Two AdamW groups: matrices and convolutions decay; biases, norms and other 1-D
    parameters (and scalars) do not, as is usual for transformers."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for module in modules:
        for parameter in module.parameters():
            if not parameter.requires_grad:
                continue
            (decay if parameter.ndim >= 2 else no_decay).append(parameter)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(
    modules: Iterable[nn.Module], lr: float, weight_decay: float
) -> torch.optim.AdamW:
    """AdamW over every trainable parameter, with the fused kernel (CUDA and CPU alike).

    The fused kernel is what lets a step be skipped without a host-device sync: it reads the
    optimizer's `found_inf` attribute (a float scalar on the parameters' device, set by
    `GradScaler` or by the training loop) and, when it is nonzero, leaves the parameters and
    moments as they are and takes back its increment of the step count.
    """
    groups = parameter_groups(modules, weight_decay)
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), fused=True)


def cosine_with_warmup(step: int, warmup_steps: int, total_steps: int, floor: float = 0.0) -> float:
    """Learning-rate multiplier: linear from 0 to 1 over `warmup_steps`, then a cosine down to
    `floor` at `total_steps`."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: cosine_with_warmup(step, warmup_steps, total_steps)
    )
