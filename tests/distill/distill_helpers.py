"""Hand-built attention captures and slow, obvious reference computations for the tests."""

from __future__ import annotations

import math

import torch

from samkd.models.attention_capture import AttentionCapture


def make_capture(
    batch: int,
    heads: int,
    grid: tuple[int, int],
    window: int = 0,
    head_dim: int = 4,
    with_bias: bool = False,
    with_rel_pos: bool = False,
    seed: int = 0,
    requires_grad: bool = False,
) -> AttentionCapture:
    """A random capture laid out as `AttentionCapture` documents (windowed blocks padded)."""
    generator = torch.Generator().manual_seed(seed)
    height, width = grid
    if window:
        padded = (math.ceil(height / window) * window, math.ceil(width / window) * window)
        windows = (padded[0] // window) * (padded[1] // window)
        rows = cols = window
    else:
        padded, windows, (rows, cols) = grid, 1, grid
    tokens = rows * cols

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).requires_grad_(requires_grad)

    return AttentionCapture(
        query=rand(batch * windows, heads, tokens, head_dim),
        key=rand(batch * windows, heads, tokens, head_dim),
        scale=head_dim**-0.5,
        grid=grid,
        window=window,
        padded_grid=padded,
        bias=rand(heads, tokens, tokens) if with_bias else None,
        rel_pos_h=rand(batch * windows, heads, tokens, rows) if with_rel_pos else None,
        rel_pos_w=rand(batch * windows, heads, tokens, cols) if with_rel_pos else None,
    )


def naive_full_attention(capture: AttentionCapture) -> torch.Tensor:
    """Dense `B x heads x N x N` map over the `N = H * W` real tokens, zero across windows,
    softmax over each window's real keys; element by element."""
    height, width = capture.grid
    rows, cols = capture.window_shape
    per_row = capture.padded_grid[1] // capture.window if capture.window else 1
    batch, heads, windows = capture.batch_size, capture.num_heads, capture.num_windows
    full = torch.zeros(batch, heads, height * width, height * width, dtype=torch.float64)
    for b in range(batch):
        for w in range(windows):
            origin_row = (w // per_row) * rows if capture.window else 0
            origin_col = (w % per_row) * cols if capture.window else 0
            real = []
            for t in range(rows * cols):
                r, c = origin_row + t // cols, origin_col + t % cols
                if r < height and c < width:
                    real.append((t, r * width + c))
            index = b * windows + w
            for h in range(heads):
                for tq, global_q in real:
                    logits = []
                    for tk, _ in real:
                        value = capture.scale * float(
                            capture.query[index, h, tq] @ capture.key[index, h, tk]
                        )
                        if capture.bias is not None:
                            value += float(capture.bias[h, tq, tk])
                        if capture.rel_pos_h is not None and capture.rel_pos_w is not None:
                            value += float(capture.rel_pos_h[index, h, tq, tk // cols])
                            value += float(capture.rel_pos_w[index, h, tq, tk % cols])
                        logits.append(value)
                    peak = max(logits)
                    exps = [math.exp(v - peak) for v in logits]
                    for (_, global_k), e in zip(real, exps, strict=True):
                        full[b, h, global_q, global_k] = e / sum(exps)
    return full


def naive_coarse(full: torch.Tensor, grid: tuple[int, int], grid_size: int) -> torch.Tensor:
    """Coarsen a dense `B x heads x N x N` map: head mean, query mean and key sum per cell."""
    height, width = grid
    cells = grid_size * grid_size

    def cell(token: int) -> int:
        r, c = divmod(token, width)
        return (r * grid_size // height) * grid_size + c * grid_size // width

    batch = full.shape[0]
    coarse = torch.zeros(batch, cells, cells, dtype=torch.float64)
    counts = [0] * cells
    for q in range(height * width):
        counts[cell(q)] += 1
    head_mean = full.mean(1)
    for b in range(batch):
        for q in range(height * width):
            for k in range(height * width):
                coarse[b, cell(q), cell(k)] += head_mean[b, q, k]
    for i in range(cells):
        coarse[:, i] /= counts[i]
    return coarse
