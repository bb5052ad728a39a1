"""Losses in float32 under mixed precision.

Training runs its forward under `torch.autocast(..., dtype=torch.bfloat16)`, and autocast
overrides a loss's own `.float()` casts: inside the region, matmul, einsum, bmm and the like
cast their float32 inputs back down to bfloat16. Loss terms are small differences of large
sums (an RKD angle loss near 1e-5, attention rows that must sum to 1), so they are computed
with autocast off instead.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import torch

P = ParamSpec("P")
R = TypeVar("R")


def _to_float32(value: object) -> object:
    if isinstance(value, torch.Tensor) and value.dtype in (torch.float16, torch.bfloat16):
        return value.float()
    return value


def float32_loss(fn: Callable[P, R]) -> Callable[P, R]:
    """Run `fn` with autocast off and its half-precision tensor arguments cast to float32.

    Only top-level arguments are cast (float64 is left alone); anything else `fn` reads, such
    as the tensors of an `AttentionCapture`, it casts itself. Decorate the function that a
    `torch.utils.checkpoint` recomputes, not only its caller, so that the recomputation in the
    backward pass is float32 as well.
    """

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        cast_args = [_to_float32(arg) for arg in args]
        cast_kwargs = {key: _to_float32(arg) for key, arg in kwargs.items()}
        # Autocast is per device type. Meta tensors are never autocast (and
        # `torch.autocast("meta")` raises), so they only need the cast.
        with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
            return fn(*cast_args, **cast_kwargs)  # type: ignore[arg-type]

    return wrapper
