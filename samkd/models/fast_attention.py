"""Fast path for the segment-anything ViT teachers: fused attention, optional `torch.compile`.

SAM's attention computes, per window (or over the whole grid in its global blocks),

    softmax(scale * q @ k^T + B) @ v,   B[(qh, qw), (kh, kw)] = rel_h[q, kh] + rel_w[q, kw],

with `rel_h = q @ R_h[qh - kh]^T` and `rel_w = q @ R_w[qw - kw]^T` (unscaled queries, the tables
from segment-anything's `get_rel_pos`). The reference module materialises the full attention
matrix and adds the decomposed terms to it; the fast path builds `B` as an additive mask
`windows x heads x N x N` in the compute dtype (a chunk of windows at a time, at most
`MASK_BUDGET_BYTES` of mask) and hands it to
`torch.nn.functional.scaled_dot_product_attention`, which picks a fused kernel where one
exists (memory-efficient attention on CUDA; the flash or math kernel on the CPU).

What is kept: parameters, state-dict keys and module types are unchanged (only the forward of
each `Attention` instance is replaced, and `remove()` puts the class's forward back); the
`qkv` projection is still called as a module, so its forward hooks fire and the taps
`encoder.qk.<i>` capture the same queries and keys, while `encoder.block.<i>` taps see the same
block outputs. Attention blocks without a tap simply run the fused kernel.

Precision is set by the caller's autocast (`extract.precision`, `train.precision`: bf16 on
CUDA by default); the attention then runs in the dtype of the `qkv` output, mask included.

Tolerance (random-weight `vit_mini` and a windowed + global test ViT, 256 and 320 px, see
`tests/models/test_fast_attention.py`): in float32 the encoder output differs from the
unmodified module by at most `FLOAT32_TOLERANCE` = 1e-4 absolute (typically ~1e-6; only the
summation order changes). Under bf16 autocast both the reference and the fast path round to
bf16; their difference is of the order of bf16 rounding (relative ~1e-2 of the embedding's
scale), the same as the reference under bf16 against itself in float32, and is measured by
`benchmarks/gpu_check.py` on the real models.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam
from segment_anything.modeling.common import MLPBlock
from segment_anything.modeling.image_encoder import Attention as SamAttention
from segment_anything.modeling.image_encoder import get_rel_pos
from torch import nn

FastTeacherMode = Literal["auto", "on", "off"]

_UNSET = object()

# Largest absolute difference of float32 encoder outputs, fast path vs reference.
FLOAT32_TOLERANCE = 1e-4
# Most bytes of relative-position mask alive at once (see `sdpa_attention`).
MASK_BUDGET_BYTES = 1 << 30

AttentionCore = Callable[
    [torch.Tensor, int, float, torch.Tensor | None, torch.Tensor | None], torch.Tensor
]
MlpCore = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None],
    torch.Tensor,
]


def fast_teacher_enabled(mode: FastTeacherMode, device: torch.device | str) -> bool:
    """`on` / `off` as given; `auto`: on for CUDA devices, off elsewhere (the CPU)."""
    if mode == "auto":
        return torch.device(device).type == "cuda"
    return mode == "on"


def decomposed_rel_pos_terms(
    query: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, grid: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM's decomposed relative position terms (segment-anything's `add_decomposed_rel_pos`,
    which uses the unscaled queries).

    `query`: windows x heads x (rows * cols) x head_dim. Returns `rel_h`
    windows x heads x T x rows and `rel_w` windows x heads x T x cols (T = rows * cols):
    `q . R_h[qh, kh]` and `q . R_w[qw, kw]`, in the query's dtype.
    """
    rows, cols = grid
    table_h = get_rel_pos(rows, rows, rel_pos_h).to(query.dtype)  # rows x rows x head_dim
    table_w = get_rel_pos(cols, cols, rel_pos_w).to(query.dtype)  # cols x cols x head_dim
    spatial = query.unflatten(2, (rows, cols))
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", spatial, table_h).flatten(2, 3)
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", spatial, table_w).flatten(2, 3)
    return rel_h, rel_w


def decomposed_rel_pos_bias(
    query: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, grid: tuple[int, int]
) -> torch.Tensor:
    """SAM's relative position term as an additive mask.

    `query`: windows x heads x (rows * cols) x head_dim, unscaled. Returns
    windows x heads x N x N (N = rows * cols) in the query's dtype, whose entry for query
    (qh, qw) and key (kh, kw) is `q . R_h[qh, kh] + q . R_w[qw, kw]`.
    """
    rel_h, rel_w = decomposed_rel_pos_terms(query, rel_pos_h, rel_pos_w, grid)
    bias = rel_h[..., :, None] + rel_w[..., None, :]  # b x n x T x rows x cols
    return bias.flatten(3).to(query.dtype)


def sdpa_attention(
    qkv: torch.Tensor,
    num_heads: int,
    scale: float,
    rel_pos_h: torch.Tensor | None,
    rel_pos_w: torch.Tensor | None,
    mask_budget_bytes: int = MASK_BUDGET_BYTES,
) -> torch.Tensor:
    """Attention of SAM's `Attention` from its `qkv` output (windows x h x w x 3C), before
    the output projection: windows x h x w x C.

    The relative-position mask is built for at most `mask_budget_bytes` at a time, a chunk of
    windows after another: a global block of ViT-H at 1024 px needs 512 MiB of bf16 mask per
    image, which a large extraction batch would otherwise hold all at once.
    """
    windows, rows, cols, _ = qkv.shape
    per_head = qkv.reshape(windows, rows * cols, 3, num_heads, -1).permute(2, 0, 3, 1, 4)
    query, key, value = per_head.unbind(0)
    if rel_pos_h is None or rel_pos_w is None:
        out = F.scaled_dot_product_attention(query, key, value, scale=scale)
        return out.transpose(1, 2).reshape(windows, rows, cols, -1)
    tokens = rows * cols
    mask_bytes = num_heads * tokens * tokens * query.element_size()
    step = max(1, mask_budget_bytes // mask_bytes)
    out = torch.empty_like(query)
    for start in range(0, windows, step):
        chunk = slice(start, start + step)
        mask = decomposed_rel_pos_bias(query[chunk], rel_pos_h, rel_pos_w, (rows, cols))
        out[chunk] = F.scaled_dot_product_attention(
            query[chunk], key[chunk], value[chunk], attn_mask=mask, scale=scale
        )
    return out.transpose(1, 2).reshape(windows, rows, cols, -1)


def gelu_mlp(
    x: torch.Tensor,
    weight1: torch.Tensor,
    bias1: torch.Tensor | None,
    weight2: torch.Tensor,
    bias2: torch.Tensor | None,
) -> torch.Tensor:
    """segment-anything's `MLPBlock` with its default GELU, as a function of its weights."""
    return F.linear(F.gelu(F.linear(x, weight1, bias1)), weight2, bias2)


def _attention_forward(attention: SamAttention, core: AttentionCore) -> Callable[..., Any]:
    def forward(self: SamAttention, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv(x)  # a module call: the qkv hooks of the taps fire here
        rel_pos_h = self.rel_pos_h if self.use_rel_pos else None
        rel_pos_w = self.rel_pos_w if self.use_rel_pos else None
        return self.proj(core(qkv, self.num_heads, self.scale, rel_pos_h, rel_pos_w))

    return types.MethodType(forward, attention)


def _mlp_forward(mlp: MLPBlock, core: MlpCore) -> Callable[..., Any]:
    def forward(self: MLPBlock, x: torch.Tensor) -> torch.Tensor:
        return core(x, self.lin1.weight, self.lin1.bias, self.lin2.weight, self.lin2.bias)

    return types.MethodType(forward, mlp)


def _is_plain_gelu(mlp: MLPBlock) -> bool:
    return type(mlp.act) is nn.GELU and mlp.act.approximate == "none"


class FastAttentionHandle:
    """The modules switched to the fast path; `remove()` (or leaving the `with` block)
    restores their own forward. Removing twice is harmless."""

    def __init__(self) -> None:
        self._patched: list[tuple[nn.Module, Any]] = []
        self.attention_modules = 0
        self.compiled = False

    def _patch(self, module: nn.Module, forward: Callable[..., Any]) -> None:
        # An instance attribute shadows the class's forward; `_call_impl` (and its hooks) still
        # runs around it.
        self._patched.append((module, module.__dict__.get("forward", _UNSET)))
        module.__dict__["forward"] = forward

    def remove(self) -> None:
        """Puts back the forward each module had before the fast path."""
        while self._patched:
            module, previous = self._patched.pop()
            if previous is _UNSET:
                module.__dict__.pop("forward", None)
            else:
                module.__dict__["forward"] = previous

    @property
    def active(self) -> bool:
        return bool(self._patched)

    def __enter__(self) -> FastAttentionHandle:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.remove()


def _sam_attention_modules(module: nn.Module) -> list[SamAttention]:
    found = [m for m in module.modules() if isinstance(m, SamAttention)]
    if not found:
        raise TypeError(
            f"{type(module).__name__} has no segment-anything ViT attention (the fast path is "
            "for the SAM ViT teachers only)"
        )
    return found


def enable_fast_attention(encoder: nn.Module, *, compile: bool = False) -> FastAttentionHandle:
    """Switches every segment-anything `Attention` inside `encoder` (an `ImageEncoderViT` or
    a whole `Sam`) to the SDPA forward; returns the handle that restores them.

    `compile`: also run the attention core (mask, SDPA) and each block's MLP through
    `torch.compile`; the `qkv` projections, and with them the taps, stay eager.
    TypeError when `encoder` has no such attention module (TinyViT students, for instance).
    """
    attention_modules = _sam_attention_modules(encoder)
    attention_core: AttentionCore = sdpa_attention
    mlp_core: MlpCore = gelu_mlp
    if compile:
        attention_core = torch.compile(sdpa_attention)
        mlp_core = torch.compile(gelu_mlp)
    handle = FastAttentionHandle()
    try:
        for attention in attention_modules:
            handle._patch(attention, _attention_forward(attention, attention_core))
        if compile:
            for mlp in encoder.modules():
                if isinstance(mlp, MLPBlock) and _is_plain_gelu(mlp):
                    handle._patch(mlp, _mlp_forward(mlp, mlp_core))
    except BaseException:
        handle.remove()
        raise
    handle.attention_modules = len(attention_modules)
    handle.compiled = compile
    return handle


@contextmanager
def fast_attention(encoder: nn.Module, *, compile: bool = False) -> Iterator[FastAttentionHandle]:
    """`enable_fast_attention` for the duration of the block."""
    handle = enable_fast_attention(encoder, compile=compile)
    try:
        yield handle
    finally:
        handle.remove()


def optimize_teacher(model: Sam, *, compile: bool = False) -> FastAttentionHandle:
    """Puts a SAM ViT teacher's image encoder on the fast path (see `enable_fast_attention`);
    the prompt encoder and mask decoder are left as they are."""
    return enable_fast_attention(model.image_encoder, compile=compile)
