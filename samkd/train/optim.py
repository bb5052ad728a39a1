"""AdamW without decay on 1-D parameters, per-part learning rates, and a cosine schedule with
linear warmup."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn


def part_lr_scales(model: nn.Module, scales: Mapping[str, float]) -> dict[nn.Parameter, float]:
    """Every parameter of the submodules named in `scales` (e.g. `image_encoder`), mapped to
    that submodule's multiple of the base learning rate."""
    return {
        parameter: scale
        for part, scale in scales.items()
        for parameter in model.get_submodule(part).parameters()
    }


def encoder_layer_lr_scales(encoder: nn.Module, decay: float) -> dict[nn.Parameter, float]:
    """Layer-wise learning-rate decay of an image encoder with `n` blocks: block `i` (from 1)
    scales by `decay^(n + 1 - i)`, the patch embedding (and ViT's position embedding) by
    `decay^(n + 1)`, the rest (the neck) by 1. TinyViT's blocks are counted through its
    stages; a stage's patch merging goes with the stage's last block."""
    depth_of = dict.fromkeys(encoder.get_submodule("patch_embed").parameters(), 0)
    position = getattr(encoder, "pos_embed", None)
    if isinstance(position, nn.Parameter):
        depth_of[position] = 0
    layers = getattr(encoder, "layers", None)
    stages = list(layers) if isinstance(layers, nn.ModuleList) else [encoder]
    depth = 0
    for stage in stages:
        for block in stage.get_submodule("blocks").children():
            depth += 1
            depth_of.update(dict.fromkeys(block.parameters(), depth))
        downsample = getattr(stage, "downsample", None)
        if isinstance(downsample, nn.Module):
            depth_of.update(dict.fromkeys(downsample.parameters(), depth))
    top = depth + 1
    return {p: decay ** (top - depth_of.get(p, top)) for p in encoder.parameters()}


def parameter_groups(
    modules: Iterable[nn.Module],
    weight_decay: float,
    lr: float,
    lr_scales: Mapping[nn.Parameter, float] | None = None,
) -> list[dict[str, Any]]:
    """AdamW groups of the trainable parameters: per learning rate `lr * scale` (a parameter
    absent from `lr_scales` has scale 1), one group whose matrices and convolutions decay and
    one whose biases, norms and other 1-D parameters (and scalars) do not, as is usual for
    transformers.

    Parameters of equal scale share their two groups, so equal scales give exactly the two
    groups of a single learning rate (and load its optimizer checkpoints)."""
    scale_of = lr_scales or {}
    by_scale: dict[float, tuple[list[nn.Parameter], list[nn.Parameter]]] = {}
    for module in modules:
        for parameter in module.parameters():
            if not parameter.requires_grad:
                continue
            decay, no_decay = by_scale.setdefault(scale_of.get(parameter, 1.0), ([], []))
            (decay if parameter.ndim >= 2 else no_decay).append(parameter)
    return [
        {"params": params, "weight_decay": group_decay, "lr": lr * scale}
        for scale, (decay, no_decay) in by_scale.items()
        for params, group_decay in ((decay, weight_decay), (no_decay, 0.0))
    ]


def build_optimizer(
    modules: Iterable[nn.Module],
    lr: float,
    weight_decay: float,
    lr_scales: Mapping[nn.Parameter, float] | None = None,
) -> torch.optim.AdamW:
    """AdamW over every trainable parameter, at `lr` times its scale in `lr_scales` (default 1),
    with the fused kernel (CUDA and CPU alike).

    The fused kernel is what lets a step be skipped without a host-device sync: it reads the
    optimizer's `found_inf` attribute (a float scalar on the parameters' device, set by
    `GradScaler` or by the training loop) and, when it is nonzero, leaves the parameters and
    moments as they are and takes back its increment of the step count.
    """
    groups = parameter_groups(modules, weight_decay, lr, lr_scales)
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
    """The same multiplier for every group: each keeps its ratio to the others."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: cosine_with_warmup(step, warmup_steps, total_steps)
    )


def scheduled_lr(scheduler: torch.optim.lr_scheduler.LambdaLR, peak_lr: float) -> float:
    """The learning rate of scale 1 at the scheduler's current step: `peak_lr` times the
    schedule's multiplier."""
    return peak_lr * scheduler.lr_lambdas[0](scheduler.last_epoch)
