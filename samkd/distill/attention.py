"""Attention matching on coarse, head-averaged attention maps.

A full map is too large to keep or compare (one ViT-H global block: 16 x 4096 x 4096 per image),
so both models' attention is coarsened onto a `G x G` grid of token cells:

    A[q_cell, k_cell] = mean_{q in q_cell} sum_{k in k_cell} mean_heads softmax_k(logits)[q, k]

Each row is still a distribution over key cells. Token row `r` of an `H`-row grid falls in cell
row `floor(r * G / H)` (columns likewise), so grids not divisible by `G` work too.

Windowed blocks attend inside their window only, which gives a block-sparse full map; it coarsens
the same way. Windowed blocks also attend to their zero padding (see `AttentionCapture`): the
probabilities are renormalised over the real tokens of the window (the padded keys are masked out
of the softmax, which is the same thing), and padded queries are left out of the average.
"""

from __future__ import annotations

import dataclasses

import torch
from torch.utils.checkpoint import checkpoint

from samkd.distill.precision import float32_loss
from samkd.models.attention_capture import AttentionCapture


def window_token_positions(capture: AttentionCapture) -> tuple[torch.Tensor, torch.Tensor]:
    """Grid row and column of every token of every window, each `nW x T` (long), on the
    capture's device (computed there: a host-to-device copy in every step would wait for the
    device).

    Padded tokens get rows `>= H` or columns `>= W`.
    """
    device = capture.query.device
    rows, cols = capture.window_shape
    local = torch.arange(rows * cols, device=device)
    local_row, local_col = local // cols, local % cols
    if capture.window == 0:
        return local_row[None], local_col[None]
    windows_per_row = capture.padded_grid[1] // capture.window
    window = torch.arange(capture.num_windows, device=device)
    window_row, window_col = window // windows_per_row, window % windows_per_row
    token_row = window_row[:, None] * capture.window + local_row[None, :]
    token_col = window_col[:, None] * capture.window + local_col[None, :]
    return token_row, token_col


def cell_assignment(capture: AttentionCapture, grid_size: int) -> torch.Tensor:
    """One-hot cell of every token of every window, `nW x T x G^2` (float32, on the capture's
    device); rows of padded tokens are all zero."""
    height, width = capture.grid
    if grid_size > min(height, width):
        raise ValueError(f"grid_size {grid_size} exceeds the {height} x {width} token grid")
    token_row, token_col = window_token_positions(capture)
    real = (token_row < height) & (token_col < width)
    cell = (token_row * grid_size // height) * grid_size + token_col * grid_size // width
    cell = torch.where(real, cell, 0)
    one_hot = torch.nn.functional.one_hot(cell, grid_size * grid_size).float()
    return one_hot * real[..., None]


def axis_assignment(capture: AttentionCapture, grid_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One-hot cell row of every token row and cell column of every token column, per window:
    `nW x rows x G` and `nW x cols x G` (float32, zero for padding).

    Cells are products of a row band and a column band, so summing a window's probabilities
    over key columns, then over key rows, costs far less than one `T x G^2` product.
    """
    height, width = capture.grid
    token_row, token_col = window_token_positions(capture)
    rows, cols = capture.window_shape
    row_of_window = token_row.view(-1, rows, cols)[:, :, 0]  # nW x rows
    col_of_window = token_col.view(-1, rows, cols)[:, 0, :]  # nW x cols

    def one_hot(position: torch.Tensor, size: int) -> torch.Tensor:
        real = position < size
        cell = torch.where(real, position * grid_size // size, 0)
        return torch.nn.functional.one_hot(cell, grid_size).float() * real[..., None]

    return one_hot(row_of_window, height), one_hot(col_of_window, width)


def _head(capture: AttentionCapture, head: int) -> AttentionCapture:
    """The same capture restricted to one head (views, no copies)."""

    def one(tensor: torch.Tensor | None, dim: int) -> torch.Tensor | None:
        return None if tensor is None else tensor.narrow(dim, head, 1)

    return dataclasses.replace(
        capture,
        query=capture.query.narrow(1, head, 1),
        key=capture.key.narrow(1, head, 1),
        bias=one(capture.bias, 0),
        rel_pos_h=one(capture.rel_pos_h, 1),
        rel_pos_w=one(capture.rel_pos_w, 1),
    )


@float32_loss
def _coarse_chunk(
    capture: AttentionCapture,
    assignment: torch.Tensor,
    row_assignment: torch.Tensor,
    col_assignment: torch.Tensor,
    start: int,
    stop: int,
) -> torch.Tensor:
    """Sum over queries `[start, stop)` of one head's probabilities per (query cell, key cell),
    `B x G^2 x G^2`."""
    batch, windows = capture.batch_size, capture.num_windows
    rows, cols = capture.window_shape
    padded_key = assignment.sum(-1) == 0  # nW x T
    logits = capture.logits(start, stop).view(batch, windows, stop - start, -1)
    logits = logits.masked_fill(padded_key[None, :, None, :], float("-inf"))
    probabilities = torch.softmax(logits, dim=-1).view(batch, windows, stop - start, rows, cols)
    del logits
    per_column_band = torch.einsum("bwtrc,wcg->bwtrg", probabilities, col_assignment)
    per_key_cell = torch.einsum("bwtrg,wrh->bwthg", per_column_band, row_assignment)
    return torch.einsum("wtq,bwtk->bqk", assignment[:, start:stop], per_key_cell.flatten(-2))


@float32_loss
def coarse_attention_map(
    capture: AttentionCapture, grid_size: int = 16, query_chunk: int = 1024
) -> torch.Tensor:
    """Head-averaged attention probabilities coarsened to a `G x G` cell grid.

    `A[b, i, j] = (1 / |Q_i|) sum_{q in Q_i} sum_{k in K_j} (1 / heads) sum_h P[b, h, q, k]`,
    with `Q_i` the real query tokens in cell `i`, `K_j` the real key tokens in cell `j`, and `P`
    the softmax over the real keys of the query's window (the module docstring has the details).

    The map is built one head and `query_chunk` queries (per window) at a time, so the largest
    intermediate is `B * nW * query_chunk * T` float32 values (`T` tokens per window) times a
    small constant (about 3, for the logits, the masked logits and the probabilities). When the
    capture requires grad, each chunk is checkpointed, so the backward pass keeps the same bound.

    Args:
        capture: one attention block's queries, keys and bias terms.
        grid_size: `G`, at most the token grid's shorter side.
        query_chunk: queries per chunk.

    Returns:
        `B x G^2 x G^2` (float32); every row sums to 1.
    """
    if query_chunk < 1:
        raise ValueError(f"query_chunk must be positive, got {query_chunk}")
    assignment = cell_assignment(capture, grid_size)
    row_assignment, col_assignment = axis_assignment(capture, grid_size)
    queries_per_cell = assignment.sum((0, 1))  # G^2
    tokens = capture.query.shape[2]
    needs_grad = torch.is_grad_enabled() and any(
        tensor is not None and tensor.requires_grad
        for tensor in (capture.query, capture.key, capture.bias, capture.rel_pos_h)
    )
    cells = grid_size * grid_size
    coarse = capture.query.new_zeros(capture.batch_size, cells, cells, dtype=torch.float32)
    for head in range(capture.num_heads):
        one_head = _head(capture, head)
        for start in range(0, tokens, query_chunk):
            stop = min(tokens, start + query_chunk)
            args = (one_head, assignment, row_assignment, col_assignment, start, stop)
            if needs_grad:
                chunk = checkpoint(_coarse_chunk, *args, use_reentrant=False)
            else:
                chunk = _coarse_chunk(*args)
            coarse = coarse + chunk
    return coarse / (queries_per_cell[None, :, None] * capture.num_heads)


def coarse_attention_support(capture: AttentionCapture, grid_size: int = 16) -> torch.Tensor:
    """Which (query cell, key cell) pairs can hold attention at all, `G^2 x G^2` (bool).

    A cell pair is in the support when some window holds a real query of the first cell and a
    real key of the second; a global block's support is everything.
    """
    assignment = cell_assignment(capture, grid_size)
    present = (assignment.sum(1) > 0).float()  # nW x G^2: cells each window touches
    return (present.transpose(0, 1) @ present) > 0


@float32_loss
def attention_kl(
    student_map: torch.Tensor,
    teacher_map: torch.Tensor,
    support: torch.Tensor | None = None,
) -> torch.Tensor:
    """`mean_{b,i} KL(A_t[b, i] || A_s[b, i])` between the rows of two coarse attention maps.

    `KL(p || q) = sum_j p_j log(p_j / q_j)`, with `0 log 0 = 0`. A windowed student puts no mass
    outside the cells its windows reach, so with `support` (see `coarse_attention_support`) the
    teacher's rows are restricted to the support and renormalised first: the loss is then what
    the student can still learn, zero when the student matches, and finite.

    Args:
        student_map: `B x G^2 x G^2`, rows sum to 1.
        teacher_map: `B x G^2 x G^2`, rows sum to 1.
        support: `G^2 x G^2` bool, or None for no restriction.

    Returns:
        A scalar.
    """
    if student_map.shape != teacher_map.shape:
        raise ValueError(
            f"attention_kl: student map {tuple(student_map.shape)} does not match teacher map "
            f"{tuple(teacher_map.shape)}; use the same grid_size for both"
        )
    tiny = torch.finfo(torch.float32).tiny
    if support is not None:
        teacher_map = teacher_map * support
        teacher_map = teacher_map / teacher_map.sum(-1, keepdim=True).clamp_min(tiny)
    log_ratio = teacher_map.clamp_min(tiny).log() - student_map.clamp_min(tiny).log()
    row_kl = (teacher_map * log_ratio).sum(-1)
    return row_kl.mean()
