from __future__ import annotations

import math

import pytest
import torch

from samkd.distill.rkd import (
    angle_potential,
    distance_potential,
    grid_patches,
    relational_embeddings,
    rkd_angle_loss,
    rkd_distance_loss,
    sample_positions,
    sampled_patches,
)


def reference_distances(points: list[list[float]]) -> list[list[float]]:
    n = len(points)
    distance = [[math.dist(points[i], points[j]) for j in range(n)] for i in range(n)]
    mean = sum(distance[i][j] for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    return [[d / mean for d in row] for row in distance]


def reference_angles(points: list[list[float]]) -> list[list[list[float]]]:
    def unit(a: list[float], b: list[float]) -> list[float]:
        diff = [x - y for x, y in zip(a, b, strict=True)]
        norm = math.sqrt(sum(x * x for x in diff))
        return [x / norm for x in diff] if norm > 0 else [0.0] * len(diff)

    n = len(points)
    return [
        [
            [
                sum(
                    a * b
                    for a, b in zip(
                        unit(points[i], points[j]), unit(points[k], points[j]), strict=True
                    )
                )
                for k in range(n)
            ]
            for i in range(n)
        ]
        for j in range(n)
    ]


def smooth_l1(a: float, b: float) -> float:
    d = abs(a - b)
    return 0.5 * d * d if d < 1 else d - 0.5


@pytest.fixture
def embeddings():
    generator = torch.Generator().manual_seed(0)
    return torch.randn(2, 5, 3, generator=generator), torch.randn(2, 5, 4, generator=generator)


def test_potentials_match_references(embeddings):
    student, _ = embeddings
    for s in range(student.shape[0]):
        points = student[s].tolist()
        torch.testing.assert_close(
            distance_potential(student)[s], torch.tensor(reference_distances(points))
        )
        torch.testing.assert_close(
            angle_potential(student)[s], torch.tensor(reference_angles(points)), atol=1e-6, rtol=0
        )


def test_losses_match_references(embeddings):
    student, teacher = embeddings
    distance_total, angle_total = 0.0, 0.0
    for s in range(student.shape[0]):
        ds, dt = reference_distances(student[s].tolist()), reference_distances(teacher[s].tolist())
        as_, at = reference_angles(student[s].tolist()), reference_angles(teacher[s].tolist())
        n = len(ds)
        distance_total += sum(smooth_l1(ds[i][j], dt[i][j]) for i in range(n) for j in range(n))
        angle_total += sum(
            smooth_l1(as_[j][i][k], at[j][i][k])
            for i in range(n)
            for j in range(n)
            for k in range(n)
        )
    sets, n = student.shape[:2]
    distance = rkd_distance_loss(student, teacher)
    angle = rkd_angle_loss(student, teacher)
    assert distance.item() == pytest.approx(distance_total / (sets * n * n), rel=1e-5)
    assert angle.item() == pytest.approx(angle_total / (sets * n**3), rel=1e-5)
    assert distance.item() > 0 and angle.item() > 0


def test_zero_on_match_and_scale_invariance(embeddings):
    student, teacher = embeddings
    assert rkd_distance_loss(teacher, teacher).item() == 0.0
    assert rkd_angle_loss(teacher, teacher).item() == 0.0
    torch.testing.assert_close(distance_potential(teacher * 7.5), distance_potential(teacher))
    torch.testing.assert_close(angle_potential(teacher * 7.5), angle_potential(teacher))
    assert rkd_distance_loss(teacher * 0.01, teacher).item() == pytest.approx(0.0, abs=1e-6)
    assert rkd_angle_loss(teacher * 30.0, teacher).item() == pytest.approx(0.0, abs=1e-6)


def test_chunked_angle_loss_and_gradients_match_the_whole(embeddings):
    student, teacher = embeddings
    gradients = []
    for chunk_elements in (1, 1 << 20):
        leaf = student.clone().requires_grad_(True)
        target = teacher.clone().requires_grad_(True)
        loss = rkd_angle_loss(leaf, target, chunk_elements) + rkd_distance_loss(leaf, target)
        loss.backward()
        assert target.grad is None
        assert torch.isfinite(leaf.grad).all() and leaf.grad.abs().sum() > 0
        gradients.append((loss.detach(), leaf.grad))
    torch.testing.assert_close(gradients[0][0], gradients[1][0])
    torch.testing.assert_close(gradients[0][1], gradients[1][1])


def test_coincident_points_give_finite_gradients():
    points = torch.zeros(1, 4, 3)
    points[0, 1] = 1.0
    leaf = points.clone().requires_grad_(True)
    teacher = torch.randn(1, 4, 3, generator=torch.Generator().manual_seed(1))
    (rkd_distance_loss(leaf, teacher) + rkd_angle_loss(leaf, teacher)).backward()
    assert torch.isfinite(leaf.grad).all()


def test_patches():
    features = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    patches = grid_patches(features, 2)
    assert patches.shape == (2, 4, 3)
    assert patches[1, 3, 2].item() == features[1, 2, 2:, 2:].mean().item()
    generator = torch.Generator().manual_seed(0)
    positions = sample_positions(2, 16, 5, generator)
    assert positions.shape == (2, 5)
    assert all(len(set(row.tolist())) == 5 for row in positions)
    again = sample_positions(2, 16, 5, torch.Generator().manual_seed(0))
    assert torch.equal(positions, again)
    sampled = sampled_patches(features, positions)
    y, x = divmod(int(positions[1, 2]), 4)
    assert torch.equal(sampled[1, 2], features[1, :, y, x])
    shared = sample_positions(3, 16, 5, generator, same_for_batch=True)
    assert (shared == shared[0]).all()
    assert relational_embeddings(patches, across_batch=True).shape == (1, 2, 12)
    assert relational_embeddings(patches, across_batch=False).shape == (2, 4, 3)
