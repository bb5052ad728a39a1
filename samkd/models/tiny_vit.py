"""TinyViT image encoder of MobileSAM (TinyViT-5M with SAM's neck).

Parameter and buffer names follow MobileSAM's `TinyViT`, so the official `mobile_sam.pt` weights
load with `strict=True`. Unlike that code, the token grid is read from the input rather than fixed
at construction, so one encoder runs at any image size that is a multiple of 16.

Layout: stage 0 is convolutional (MBConv blocks, `B x C x H x W`); later stages are windowed
attention blocks working on channel-last tokens (`B x H x W x C`). Every stage takes and returns
`B x C x H x W`; its patch merging (if any) belongs to the stage, so stage `i` returns the width
and resolution of stage `i + 1`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from segment_anything.modeling.common import LayerNorm2d
from segment_anything.modeling.image_encoder import window_partition, window_unpartition
from torch import nn

from samkd.models.common import forward_blocks

# Two stride-2 convolutions in the patch embedding.
PATCH_EMBED_STRIDE = 4


class Conv2dBN(nn.Module):
    """Convolution without bias followed by batch norm."""

    def __init__(
        self,
        in_chans: int,
        out_chans: int,
        kernel_size: int = 1,
        stride: int = 1,
        padding: int = 0,
        groups: int = 1,
        bn_weight_init: float = 1.0,
    ) -> None:
        super().__init__()
        self.c = nn.Conv2d(
            in_chans, out_chans, kernel_size, stride, padding, groups=groups, bias=False
        )
        self.bn = nn.BatchNorm2d(out_chans)
        nn.init.constant_(self.bn.weight, bn_weight_init)
        nn.init.zeros_(self.bn.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """B x C_in x H x W -> B x C_out x H' x W'."""
        return self.bn(self.c(x))


class DropPath(nn.Module):
    """Stochastic depth: drops a residual branch for whole samples while training."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep_prob = 1.0 - self.drop_prob
        mask_shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = x.new_empty(mask_shape).bernoulli_(keep_prob)
        return x * mask / keep_prob

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class PatchEmbed(nn.Module):
    """Two stride-2 3x3 convolutions: B x C_in x H x W -> B x C x H/4 x W/4."""

    def __init__(self, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.seq = nn.Sequential(
            Conv2dBN(in_chans, embed_dim // 2, kernel_size=3, stride=2, padding=1),
            nn.GELU(),
            Conv2dBN(embed_dim // 2, embed_dim, kernel_size=3, stride=2, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(x)


class MBConv(nn.Module):
    """Inverted residual block: 1x1 expand, 3x3 depthwise, 1x1 project, on B x C x H x W."""

    def __init__(self, dim: int, expand_ratio: float, drop_path: float) -> None:
        super().__init__()
        hidden = int(dim * expand_ratio)
        self.conv1 = Conv2dBN(dim, hidden)
        self.act1 = nn.GELU()
        self.conv2 = Conv2dBN(hidden, hidden, kernel_size=3, padding=1, groups=hidden)
        self.act2 = nn.GELU()
        # Zero-initialised so that each block starts as the identity.
        self.conv3 = Conv2dBN(hidden, dim, bn_weight_init=0.0)
        self.act3 = nn.GELU()
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """B x C x H x W -> B x C x H x W."""
        y = self.act1(self.conv1(x))
        y = self.act2(self.conv2(y))
        y = self.conv3(y)
        return self.act3(x + self.drop_path(y))


class PatchMerging(nn.Module):
    """Changes width and (with stride 2) halves resolution: B x C x H x W -> B x C' x H' x W'."""

    def __init__(self, dim: int, out_dim: int, stride: int) -> None:
        super().__init__()
        self.conv1 = Conv2dBN(dim, out_dim)
        self.act = nn.GELU()
        self.conv2 = Conv2dBN(
            out_dim, out_dim, kernel_size=3, stride=stride, padding=1, groups=out_dim
        )
        self.conv3 = Conv2dBN(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.conv1(x))
        x = self.act(self.conv2(x))
        return self.conv3(x)


class Stage(nn.Module):
    """A stage of blocks followed by optional patch merging, B x C x H x W -> B x C' x H' x W'."""

    gradient_checkpointing: bool


class ConvLayer(Stage):
    """Stage of MBConv blocks, then optional patch merging: B x C x H x W -> B x C' x H' x W'."""

    def __init__(
        self,
        dim: int,
        depth: int,
        expand_ratio: float,
        drop_path: Sequence[float],
        downsample: PatchMerging | None,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(MBConv(dim, expand_ratio, drop_path[i]) for i in range(depth))
        self.downsample = downsample
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = forward_blocks(self.blocks, x, self.gradient_checkpointing)
        return x if self.downsample is None else self.downsample(x)


class Mlp(nn.Module):
    """Pre-norm two-layer MLP on channel-last tokens ... x C."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.norm(x))))


class Attention(nn.Module):
    """Pre-norm multi-head attention inside one window, with a learnt bias per head and offset.

    The bias depends on the absolute row and column offset between query and key, so a window of
    `w x w` tokens has `w * w` biases per head.
    """

    attention_bias_idxs: torch.Tensor

    def __init__(self, dim: int, num_heads: int, window_size: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5

        self.norm = nn.LayerNorm(dim)
        # Output laid out per head as [q, k, v], as in MobileSAM's checkpoints.
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

        self.attention_biases = nn.Parameter(torch.zeros(num_heads, window_size * window_size))
        self.register_buffer(
            "attention_bias_idxs", _window_offset_index(window_size), persistent=False
        )

    def split_qkv(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Output of `qkv`, N x T x 3C -> q, k, v, each N x heads x T x head_dim."""
        n, tokens, _ = qkv.shape
        per_head = qkv.view(n, tokens, self.num_heads, 3, self.head_dim).permute(3, 0, 2, 1, 4)
        q, k, v = per_head.unbind(0)
        return q, k, v

    def attention_bias(self) -> torch.Tensor:
        """Bias added to the scaled logits: heads x T x T."""
        return self.attention_biases[:, self.attention_bias_idxs]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Windows of tokens, N x T x C -> N x T x C."""
        n, tokens, dim = x.shape
        q, k, v = self.split_qkv(self.qkv(self.norm(x)))
        bias = self.attention_bias().to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(n, tokens, dim))


def _window_offset_index(window_size: int) -> torch.Tensor:
    """T x T index of |row offset| * window_size + |column offset| between tokens of a window.

    This numbers the offsets in the order MobileSAM's checkpoints store their biases.
    """
    rows = torch.arange(window_size).repeat_interleave(window_size)
    cols = torch.arange(window_size).repeat(window_size)
    row_offset = (rows[:, None] - rows[None, :]).abs()
    col_offset = (cols[:, None] - cols[None, :]).abs()
    return row_offset * window_size + col_offset


class TinyViTBlock(nn.Module):
    """Windowed attention, depthwise convolution, MLP; on channel-last tokens B x H x W x C."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int,
        mlp_ratio: float,
        drop_path: float,
        local_conv_size: int,
    ) -> None:
        super().__init__()
        self.window_size = window_size
        self.attn = Attention(dim, num_heads, window_size)
        self.drop_path = DropPath(drop_path)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.local_conv = Conv2dBN(
            dim, dim, kernel_size=local_conv_size, padding=local_conv_size // 2, groups=dim
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """B x H x W x C -> B x H x W x C."""
        x = x + self.drop_path(self._window_attention(x))
        # TinyViT's local convolution has no residual connection.
        x = self.local_conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return x + self.drop_path(self.mlp(x))

    def _window_attention(self, x: torch.Tensor) -> torch.Tensor:
        """B x H x W x C -> B x H x W x C, attending within zero-padded windows."""
        grid = (x.shape[1], x.shape[2])
        windows, padded_grid = window_partition(x, self.window_size)
        out = self.attn(windows.flatten(1, 2))
        # A view, not `unflatten`: tracing (ONNX export) records unflatten's sizes as
        # constants, which would fix the batch size of an exported encoder.
        out = out.view(out.shape[0], self.window_size, self.window_size, -1)
        return window_unpartition(out, self.window_size, padded_grid, grid)


class BasicLayer(Stage):
    """Stage of TinyViT blocks, then optional patch merging: B x C x H x W -> B x C' x H' x W'."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window_size: int,
        mlp_ratio: float,
        drop_path: Sequence[float],
        local_conv_size: int,
        downsample: PatchMerging | None,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            TinyViTBlock(dim, num_heads, window_size, mlp_ratio, drop_path[i], local_conv_size)
            for i in range(depth)
        )
        self.downsample = downsample
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = forward_blocks(self.blocks, x.permute(0, 2, 3, 1), self.gradient_checkpointing)
        x = tokens.permute(0, 3, 1, 2)
        return x if self.downsample is None else self.downsample(x)


class TinyViT(nn.Module):
    """TinyViT backbone with SAM's neck: B x 3 x H x W -> B x out_chans x H/16 x W/16.

    The defaults are MobileSAM's image encoder (TinyViT-5M). `num_heads[0]` and
    `window_sizes[0]` are unused, since stage 0 is convolutional; they are kept so that each
    per-stage sequence has one entry per stage. `merge_strides[i]` is the stride of the patch
    merging between stages `i` and `i + 1`; the total stride must be 16 for SAM's decoder.
    `norm_head` and `head` are the ImageNet classifier of TinyViT: unused by SAM, kept so
    MobileSAM checkpoints load strictly.
    """

    def __init__(
        self,
        img_size: int = 1024,
        in_chans: int = 3,
        embed_dims: Sequence[int] = (64, 128, 160, 320),
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (2, 4, 5, 10),
        window_sizes: Sequence[int] = (7, 7, 14, 7),
        merge_strides: Sequence[int] = (2, 2, 1),
        mlp_ratio: float = 4.0,
        mbconv_expand_ratio: float = 4.0,
        local_conv_size: int = 3,
        drop_path_rate: float = 0.0,
        num_classes: int = 1000,
        out_chans: int = 256,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        num_stages = len(depths)
        if not len(embed_dims) == len(num_heads) == len(window_sizes) == num_stages:
            raise ValueError("embed_dims, num_heads and window_sizes need one entry per stage")
        if len(merge_strides) != num_stages - 1:
            raise ValueError("merge_strides needs one entry per pair of consecutive stages")
        self.img_size = img_size
        self.stride = PATCH_EMBED_STRIDE
        for merge_stride in merge_strides:
            self.stride *= merge_stride

        self.patch_embed = PatchEmbed(in_chans, embed_dims[0])
        drop_path = _linear_schedule(drop_path_rate, sum(depths))
        self.layers = nn.ModuleList()
        for i in range(num_stages):
            downsample = None
            if i < num_stages - 1:
                downsample = PatchMerging(embed_dims[i], embed_dims[i + 1], merge_strides[i])
            stage_drop_path = drop_path[sum(depths[:i]) : sum(depths[: i + 1])]
            layer: Stage
            if i == 0:
                layer = ConvLayer(
                    embed_dims[0], depths[0], mbconv_expand_ratio, stage_drop_path, downsample
                )
            else:
                layer = BasicLayer(
                    embed_dims[i],
                    depths[i],
                    num_heads[i],
                    window_sizes[i],
                    mlp_ratio,
                    stage_drop_path,
                    local_conv_size,
                    downsample,
                )
            self.layers.append(layer)

        self.norm_head = nn.LayerNorm(embed_dims[-1])
        self.head = nn.Linear(embed_dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dims[-1], out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )
        self.apply(_init_linear)
        self.set_gradient_checkpointing(gradient_checkpointing)

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute each block's activations in backward instead of storing them."""
        for layer in self.layers:
            if isinstance(layer, Stage):
                layer.gradient_checkpointing = enabled

    @property
    def gradient_checkpointing(self) -> bool:
        return any(isinstance(s, Stage) and s.gradient_checkpointing for s in self.layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images B x 3 x H x W (H, W multiples of 16) -> B x out_chans x H/16 x W/16."""
        height, width = x.shape[-2:]
        if height % self.stride or width % self.stride:
            raise ValueError(
                f"TinyViT needs an image size that is a multiple of {self.stride}, "
                f"got {height} x {width}"
            )
        x = self.patch_embed(x)
        for layer in self.layers:
            x = layer(x)
        return self.neck(x)


def _linear_schedule(last: float, steps: int) -> list[float]:
    """`steps` values rising linearly from 0 to `last` (stochastic depth grows with depth)."""
    if steps == 1:
        return [0.0]
    return [last * i / (steps - 1) for i in range(steps)]


def _init_linear(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
