"""What an `encoder.qk.<i>` tap captures: enough of one attention block to rebuild its logits.

A full attention map is far too large to keep (one ViT-H global block is 16 x 4096 x 4096 per
image), so the taps keep the block's queries and keys and the bias terms that the block adds to
`scale * q @ k^T`. Consumers (for example coarse attention maps in `samkd.distill`) rebuild the
probabilities a chunk of queries at a time.

Layout conventions, shared by SAM's ViT (global and windowed blocks) and TinyViT:

- The image's token grid is `grid = (H, W)`. Windowed blocks pad it bottom-right to
  `padded_grid = (Hp, Wp)`, multiples of `window`, and split it into
  `nW = (Hp/window) * (Wp/window)` windows in row-major order; global blocks have `window = 0`,
  `padded_grid == grid`, `nW = 1`.
- `query` and `key` are `(B * nW) x heads x T x head_dim`, with `T = window**2` (or `H * W` for a
  global block) tokens in row-major order inside each window; the batch index is the slow one.
- logits = `scale * query @ key^T + bias + rel_h + rel_w`, where
  - `bias` is `heads x T x T` (TinyViT's learnt attention biases) or None;
  - `rel_pos_h` is `(B * nW) x heads x T x h` and `rel_pos_w` is `(B * nW) x heads x T x w`
    (SAM's decomposed relative positions; `h x w` is the window's or the grid's token shape):
    the logit of query `q` for the key at row `kh`, column `kw` gets
    `rel_pos_h[..., q, kh] + rel_pos_w[..., q, kw]`. Both None when the block has none.
- Padded tokens take part in windowed attention (both models attend to the zero padding);
  consumers that need distributions over real tokens renormalise over them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AttentionCapture:
    """Queries, keys and bias terms of one attention block (see the module docstring)."""

    query: torch.Tensor
    key: torch.Tensor
    scale: float
    grid: tuple[int, int]
    window: int
    padded_grid: tuple[int, int]
    bias: torch.Tensor | None = None
    rel_pos_h: torch.Tensor | None = None
    rel_pos_w: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.query.shape[0] // self.num_windows

    @property
    def num_heads(self) -> int:
        return self.query.shape[1]

    @property
    def num_windows(self) -> int:
        if self.window == 0:
            return 1
        hp, wp = self.padded_grid
        return (hp // self.window) * (wp // self.window)

    @property
    def window_shape(self) -> tuple[int, int]:
        """Token rows x columns inside one window (the whole grid for a global block)."""
        return (self.window, self.window) if self.window else self.grid

    def logits(self, query_start: int = 0, query_stop: int | None = None) -> torch.Tensor:
        """Attention logits for queries `[query_start, query_stop)` of every window.

        Returns `(B * nW) x heads x t x T` with `t = query_stop - query_start`, float32 for a
        capture taken under autocast too, as long as autocast is off here (autocast would run
        the product in bfloat16 again; `coarse_attention_map` turns it off).
        """
        stop = self.query.shape[2] if query_stop is None else query_stop
        query = self.query[:, :, query_start:stop].float()
        logits = (query * self.scale) @ self.key.float().transpose(-2, -1)
        if self.bias is not None:
            logits = logits + self.bias[:, query_start:stop]
        if self.rel_pos_h is not None and self.rel_pos_w is not None:
            rows, cols = self.window_shape
            rel_h = self.rel_pos_h[:, :, query_start:stop]
            rel_w = self.rel_pos_w[:, :, query_start:stop]
            shaped = logits.unflatten(-1, (rows, cols))
            shaped = shaped + rel_h[..., :, None] + rel_w[..., None, :]
            logits = shaped.flatten(-2)
        return logits

    def detach(self) -> AttentionCapture:
        def _d(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.detach()

        return AttentionCapture(
            query=self.query.detach(),
            key=self.key.detach(),
            scale=self.scale,
            grid=self.grid,
            window=self.window,
            padded_grid=self.padded_grid,
            bias=_d(self.bias),
            rel_pos_h=_d(self.rel_pos_h),
            rel_pos_w=_d(self.rel_pos_w),
        )
