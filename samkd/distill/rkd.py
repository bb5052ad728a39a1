"""Relational knowledge distillation (Park et al. 2019) between patch embeddings.

The student matches how the teacher's patch embeddings relate to each other, not the embeddings
themselves, so no adapter is needed and the channel counts may differ:

- distance potential `psi_D(i, j) = ||e_i - e_j|| / mu`, `mu` the mean distance over `i != j`;
- angle potential `psi_A(i, j, k) = <(e_i - e_j) / ||e_i - e_j||, (e_k - e_j) / ||e_k - e_j||>`
  (the cosine of the angle at vertex `j`; zero when a difference vector is zero).

Both are invariant to scaling every embedding by one constant. The patches are either the cells
of a pooled `G x G` grid or `M` sampled positions, so the `O(n^3)` angle term stays bounded, and
the angle loss is accumulated a few vertices at a time so that memory stays `O(n^2)`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from samkd.distill.precision import float32_loss

ANGLE_CHUNK_ELEMENTS = 1 << 22


@float32_loss
def grid_patches(features: torch.Tensor, grid_size: int) -> torch.Tensor:
    """Average-pool a feature map onto a `G x G` grid: `B x C x H x W -> B x G^2 x C`."""
    pooled = F.adaptive_avg_pool2d(features, grid_size)
    return pooled.flatten(2).transpose(1, 2)


def sample_positions(
    batch_size: int,
    num_positions: int,
    num_samples: int,
    generator: torch.Generator | None = None,
    same_for_batch: bool = False,
) -> torch.Tensor:
    """`num_samples` distinct flat positions in `[0, num_positions)` per image, `B x M` (long).

    Drawn on the CPU from `generator`, so a seeded generator gives the same positions on any
    device. With `same_for_batch`, every image gets the same positions.
    """
    if num_samples > num_positions:
        raise ValueError(f"cannot sample {num_samples} of {num_positions} positions")
    rows = 1 if same_for_batch else batch_size
    scores = torch.rand(rows, num_positions, generator=generator)
    positions = scores.topk(num_samples, dim=1).indices
    return positions.expand(batch_size, -1)


@float32_loss
def sampled_patches(features: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Embeddings at flat positions: `B x C x H x W`, `B x M -> B x M x C`."""
    flat = features.flatten(2)  # B x C x HW
    # Drawn on the host: a blocking copy would wait for the device.
    index = positions.to(flat.device, non_blocking=True)[:, None, :].expand(-1, flat.shape[1], -1)
    return flat.gather(2, index).transpose(1, 2)


def distance_potential(embeddings: torch.Tensor) -> torch.Tensor:
    """`psi_D`: pairwise distances over their mean off-diagonal value, `S x n x C -> S x n x n`.

    Each of the `S` sets (an image's patches, or a batch of images) is normalised by its own
    `mu`. A set whose points all coincide has `psi_D = 0`.
    """
    distances = torch.cdist(embeddings, embeddings, compute_mode="donot_use_mm_for_euclid_dist")
    count = embeddings.shape[1] * (embeddings.shape[1] - 1)
    mean = distances.sum((1, 2), keepdim=True) / max(count, 1)
    return distances / mean.clamp_min(torch.finfo(distances.dtype).tiny)


def angle_potential(embeddings: torch.Tensor, vertices: slice | None = None) -> torch.Tensor:
    """`psi_A[s, j, i, k]` for vertices `j` in `vertices` (all by default): `S x n x C ->
    S x v x n x n`, `v` the number of vertices."""
    vertex = embeddings[:, vertices if vertices is not None else slice(None)]
    directions = F.normalize(embeddings[:, None, :, :] - vertex[:, :, None, :], dim=-1)
    return directions @ directions.transpose(-2, -1)


@float32_loss
def rkd_distance_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """`mean_{s,i,j} smooth_l1(psi_D^s(i, j), psi_D^t(i, j))`.

    Args:
        student: `S x n x C_s` embeddings (S sets of n points).
        teacher: `S x n x C_t`; channel counts may differ.

    Returns:
        A scalar.
    """
    _check_sets(student, teacher)
    return F.smooth_l1_loss(distance_potential(student), distance_potential(teacher.detach()))


@float32_loss
def _angle_loss_sum(student: torch.Tensor, teacher: torch.Tensor, start: int, stop: int):
    vertices = slice(start, stop)
    return F.smooth_l1_loss(
        angle_potential(student, vertices), angle_potential(teacher, vertices), reduction="sum"
    )


@float32_loss
def rkd_angle_loss(
    student: torch.Tensor, teacher: torch.Tensor, chunk_elements: int = ANGLE_CHUNK_ELEMENTS
) -> torch.Tensor:
    """`mean_{s,i,j,k} smooth_l1(psi_A^s(i, j, k), psi_A^t(i, j, k))`.

    Accumulated over groups of vertices `j` so that no intermediate exceeds about
    `chunk_elements` values (`S * v * n * max(n, C)` for `v` vertices at a time); with grad,
    each group is checkpointed so the backward pass keeps that bound.

    Args:
        student: `S x n x C_s` embeddings.
        teacher: `S x n x C_t`.
        chunk_elements: memory bound per group, in values.

    Returns:
        A scalar.
    """
    _check_sets(student, teacher)
    teacher = teacher.detach()
    sets, points = student.shape[:2]
    widest = max(points, student.shape[2], teacher.shape[2])
    vertices_per_chunk = max(1, chunk_elements // (sets * points * widest))
    needs_grad = torch.is_grad_enabled() and student.requires_grad
    total = student.new_zeros(())
    for start in range(0, points, vertices_per_chunk):
        stop = min(points, start + vertices_per_chunk)
        if needs_grad:
            total = total + checkpoint(
                _angle_loss_sum, student, teacher, start, stop, use_reentrant=False
            )
        else:
            total = total + _angle_loss_sum(student, teacher, start, stop)
    return total / (sets * points**3)


def _check_sets(student: torch.Tensor, teacher: torch.Tensor) -> None:
    if student.dim() != 3 or student.shape[:2] != teacher.shape[:2]:
        raise ValueError(
            f"RKD expects S x n x C embeddings with the same S and n, got student "
            f"{tuple(student.shape)} and teacher {tuple(teacher.shape)}"
        )


def relational_embeddings(patches: torch.Tensor, across_batch: bool) -> torch.Tensor:
    """The point sets RKD relates: `B x n x C` patches as `B` sets of `n` patches, or, across
    the batch (as in the paper), one set of `B` images, each the concatenation of its patches:
    `1 x B x (n * C)`."""
    return patches.flatten(1)[None] if across_batch else patches
