"""Named taps on intermediate results of a SAM model, for feature and attention distillation.

Tap names are the same on every model type:

- `encoder.embed`: image embedding (neck output), B x 256 x H/16 x W/16.
- `encoder.block.<i>`: output of ViT block `i` or of TinyViT stage `i` (which includes the
  stage's patch merging), as B x C x h x w.
- `encoder.qk.<i>`: an `AttentionCapture` of attention block `i`; TinyViT's attention blocks are
  numbered across stages in order. On SAM 2's Hiera, only the global-attention blocks whose
  tokens are at stride 16 (those of its third stage) have one.
- `encoder.high_res.0`, `encoder.high_res.1` (SAM 2 only): the two high-resolution maps its
  mask decoder takes, after `conv_s0` / `conv_s1`: B x 32 x H/4 x W/4 and B x 64 x H/8 x W/8.
- `decoder.upscaled`: mask decoder's upscaled image embedding, N x 32 x 4h x 4w, before the
  product with the per-mask hypernetwork weights (N = images x prompts in that call).
- `decoder.mask_logits`: low-resolution mask logits returned by the mask decoder.
- `decoder.iou`: mask quality predictions returned by the mask decoder.

Tapped tensors keep their autograd graph; detach them where no gradient is wanted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from segment_anything.modeling import ImageEncoderViT, Sam
from segment_anything.modeling.image_encoder import Attention as SamAttention
from segment_anything.modeling.image_encoder import Block as SamBlock
from torch import nn
from torch.utils.hooks import RemovableHandle

from samkd.models.attention_capture import AttentionCapture
from samkd.models.fast_attention import decomposed_rel_pos_terms
from samkd.models.tiny_vit import Attention as TinyViTAttention
from samkd.models.tiny_vit import TinyViT, TinyViTBlock

ENCODER_EMBED = "encoder.embed"
ENCODER_BLOCK = "encoder.block"
ENCODER_QK = "encoder.qk"
ENCODER_HIGH_RES = ("encoder.high_res.0", "encoder.high_res.1")
DECODER_UPSCALED = "decoder.upscaled"
DECODER_MASK_LOGITS = "decoder.mask_logits"
DECODER_IOU = "decoder.iou"

TapValue = torch.Tensor | AttentionCapture
Attach = Callable[["Taps"], list[RemovableHandle]]


class TapError(ValueError):
    """A tap name that the model does not have; one-line message."""


class Taps(Mapping[str, TapValue]):
    """Values captured by tap name. Each name holds the value of the tapped module's latest call:
    read it before calling the module again (for instance per image when looping over a batch).

    Hooks also fire when gradient checkpointing recomputes a block in backward; the recomputed
    values are equal to the stored ones.
    """

    def __init__(self, names: Sequence[str]) -> None:
        self.names = tuple(names)
        self._values: dict[str, TapValue] = {}

    def __getitem__(self, name: str) -> TapValue:
        try:
            return self._values[name]
        except KeyError:
            raise KeyError(f"tap {name!r} has not been filled by a forward pass") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def tensor(self, name: str) -> torch.Tensor:
        """The value of a tensor tap (any tap but `encoder.qk.<i>`)."""
        value = self[name]
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"tap {name!r} holds an attention capture, not a tensor")
        return value

    def attention(self, name: str) -> AttentionCapture:
        """The value of an `encoder.qk.<i>` tap."""
        value = self[name]
        if not isinstance(value, AttentionCapture):
            raise TypeError(f"tap {name!r} holds a tensor, not an attention capture")
        return value

    def clear(self) -> None:
        """Drops the captured values (and the graphs they hold on to)."""
        self._values.clear()

    def record(self, name: str, value: TapValue) -> None:
        self._values[name] = value


def available_taps(model: Sam) -> list[str]:
    """Names of every tap that `model` offers."""
    return list(_tap_points(model))


@contextmanager
def capture_taps(model: Sam, names: Sequence[str]) -> Iterator[Taps]:
    """Hooks the named taps into `model` for the duration of the block; yields the values.

    Raises TapError for names the model does not offer. All hooks are removed on exit.
    """
    points = _tap_points(model)
    unknown = [name for name in names if name not in points]
    if unknown:
        raise TapError(
            f"unknown tap {', '.join(map(repr, unknown))}; valid taps: {', '.join(points)}"
        )
    taps = Taps(names)
    handles: list[RemovableHandle] = []
    try:
        for name in dict.fromkeys(names):
            handles.extend(points[name](taps))
        yield taps
    finally:
        for handle in handles:
            handle.remove()


def _tap_points(model: Sam) -> dict[str, Attach]:
    encoder = model.image_encoder
    decoder = model.mask_decoder
    points: dict[str, Attach] = {ENCODER_EMBED: _output_tap(ENCODER_EMBED, encoder, _same)}
    if is_sam2(model):
        points.update(_hiera_tap_points(model))
    elif isinstance(encoder, ImageEncoderViT):
        for i, block in enumerate(encoder.blocks):
            points[f"{ENCODER_BLOCK}.{i}"] = _output_tap(f"{ENCODER_BLOCK}.{i}", block, _to_bchw)
        for i, block in enumerate(encoder.blocks):
            points[f"{ENCODER_QK}.{i}"] = _sam_attention_tap(f"{ENCODER_QK}.{i}", block)
    elif isinstance(encoder, TinyViT):
        for i, layer in enumerate(encoder.layers):
            points[f"{ENCODER_BLOCK}.{i}"] = _output_tap(f"{ENCODER_BLOCK}.{i}", layer, _same)
        attention_blocks = [m for m in encoder.modules() if isinstance(m, TinyViTBlock)]
        for i, block in enumerate(attention_blocks):
            points[f"{ENCODER_QK}.{i}"] = _tiny_vit_attention_tap(f"{ENCODER_QK}.{i}", block)
    else:
        raise TapError(f"no taps for image encoder {type(encoder).__name__}")
    points[DECODER_UPSCALED] = _output_tap(DECODER_UPSCALED, upscaling_output(decoder), _same)
    points[DECODER_MASK_LOGITS] = _output_tap(DECODER_MASK_LOGITS, decoder, _item(0))
    points[DECODER_IOU] = _output_tap(DECODER_IOU, decoder, _item(1))
    return points


def is_sam2(model: nn.Module) -> bool:
    """Whether `model` is a SAM 2 model (`samkd.models.sam2_model.Sam2Model`), told without
    importing the optional sam2 package."""
    return getattr(model, "family", None) == "sam2"


def upscaling_output(mask_decoder: nn.Module) -> nn.Module:
    """The module whose output is the mask decoder's upscaled embedding `N x 32 x 4h x 4w`:
    the last of `output_upscaling`, which SAM 2 calls part by part (adding its
    high-resolution maps) and SAM calls as a whole."""
    upscaling: nn.Sequential = mask_decoder.output_upscaling  # type: ignore[assignment]
    return upscaling[-1]


def _hiera_tap_points(model: nn.Module) -> dict[str, Attach]:
    """SAM 2's blocks, their stride-16 global attention, and the high-resolution maps."""
    encoder: Any = model.image_encoder
    trunk: Any = encoder.trunk
    decoder: Any = model.mask_decoder
    points: dict[str, Attach] = {}
    for i, block in enumerate(trunk.blocks):
        points[f"{ENCODER_BLOCK}.{i}"] = _output_tap(f"{ENCODER_BLOCK}.{i}", block, _to_bchw)
    for i in stride16_global_blocks(trunk):
        points[f"{ENCODER_QK}.{i}"] = _hiera_attention_tap(f"{ENCODER_QK}.{i}", trunk.blocks[i])
    for name, conv in zip(ENCODER_HIGH_RES, (decoder.conv_s0, decoder.conv_s1), strict=True):
        points[name] = _output_tap(name, conv, _same)
    return points


def stride16_global_blocks(trunk: Any) -> list[int]:
    """Hiera's global-attention blocks (window 0) in its third stage, at stride 16."""
    stage_ends: list[int] = list(trunk.stage_ends)
    return [
        i
        for i, block in enumerate(trunk.blocks)
        if block.window_size == 0 and stage_ends[1] < i <= stage_ends[2] and not block.q_stride
    ]


def _hiera_attention_tap(name: str, block: nn.Module) -> Attach:
    attention: Any = block.attn

    def capture(qkv: torch.Tensor, grid: tuple[int, int]) -> AttentionCapture:
        # qkv: B x H x W x 3C (a global block attends over the whole grid), as
        # [q, k, v] x heads x head_dim; scaled-dot-product attention's default scale.
        batch = qkv.shape[0]
        per_head = qkv.reshape(batch, grid[0] * grid[1], 3, attention.num_heads, -1)
        query, key = per_head.permute(2, 0, 3, 1, 4).unbind(0)[:2]
        return AttentionCapture(
            query=query,
            key=key,
            scale=query.shape[-1] ** -0.5,
            grid=grid,
            window=0,
            padded_grid=grid,
        )

    return _grid_and_qkv_tap(name, block, attention.qkv, capture)


def _output_tap(name: str, module: nn.Module, convert: Callable[[Any], torch.Tensor]) -> Attach:
    def attach(taps: Taps) -> list[RemovableHandle]:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            taps.record(name, convert(output))

        return [module.register_forward_hook(hook)]

    return attach


def _same(output: torch.Tensor) -> torch.Tensor:
    return output


def _to_bchw(output: torch.Tensor) -> torch.Tensor:
    """Channel-last B x H x W x C -> B x C x H x W."""
    return output.permute(0, 3, 1, 2)


def _item(index: int) -> Callable[[tuple[torch.Tensor, ...]], torch.Tensor]:
    def pick(output: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return output[index]

    return pick


def _grid_and_qkv_tap(
    name: str,
    block: nn.Module,
    qkv: nn.Module,
    capture: Callable[[torch.Tensor, tuple[int, int]], AttentionCapture],
) -> Attach:
    """Records the token grid entering `block` (B x H x W x C), then builds the capture from the
    output of its `qkv` projection, computed on that block's windows."""

    def attach(taps: Taps) -> list[RemovableHandle]:
        grid: list[tuple[int, int]] = []

        def grid_hook(_module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            grid[:] = [(inputs[0].shape[1], inputs[0].shape[2])]

        def qkv_hook(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
            taps.record(name, capture(output, grid[0]))

        return [block.register_forward_pre_hook(grid_hook), qkv.register_forward_hook(qkv_hook)]

    return attach


def _sam_attention_tap(name: str, block: SamBlock) -> Attach:
    attention: SamAttention = block.attn
    window = block.window_size

    def capture(qkv: torch.Tensor, grid: tuple[int, int]) -> AttentionCapture:
        # qkv: (B * nW) x h x w x 3C, laid out as [q, k, v] x heads x head_dim.
        windows, rows, cols, _ = qkv.shape
        per_head = qkv.reshape(windows, rows * cols, 3, attention.num_heads, -1)
        query, key = per_head.permute(2, 0, 3, 1, 4).unbind(0)[:2]
        rel_pos_h = rel_pos_w = None
        if attention.use_rel_pos:
            rel_pos_h, rel_pos_w = decomposed_rel_pos_terms(
                query, attention.rel_pos_h, attention.rel_pos_w, (rows, cols)
            )
        return AttentionCapture(
            query=query,
            key=key,
            scale=attention.scale,
            grid=grid,
            window=window,
            padded_grid=_padded(grid, window),
            rel_pos_h=rel_pos_h,
            rel_pos_w=rel_pos_w,
        )

    return _grid_and_qkv_tap(name, block, attention.qkv, capture)


def _tiny_vit_attention_tap(name: str, block: TinyViTBlock) -> Attach:
    attention: TinyViTAttention = block.attn
    window = block.window_size

    def capture(qkv: torch.Tensor, grid: tuple[int, int]) -> AttentionCapture:
        query, key, _ = attention.split_qkv(qkv)
        return AttentionCapture(
            query=query,
            key=key,
            scale=attention.scale,
            grid=grid,
            window=window,
            padded_grid=_padded(grid, window),
            bias=attention.attention_bias(),
        )

    return _grid_and_qkv_tap(name, block, attention.qkv, capture)


def _padded(grid: tuple[int, int], window: int) -> tuple[int, int]:
    """Grid rounded up to whole windows (unchanged for global attention, `window == 0`)."""
    if window == 0:
        return grid
    rows, cols = grid
    return ((rows + window - 1) // window * window, (cols + window - 1) // window * window)
