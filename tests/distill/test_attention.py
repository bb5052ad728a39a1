from __future__ import annotations

import math

import pytest
import torch

from samkd.distill.attention import attention_kl, coarse_attention_map, coarse_attention_support

from .distill_helpers import make_capture, naive_coarse, naive_full_attention


@pytest.mark.parametrize(
    "grid, window, grid_size, with_bias, with_rel_pos",
    [
        ((6, 5), 0, 4, False, True),  # global SAM block, grid not divisible by G
        ((8, 8), 0, 4, False, False),
        ((5, 7), 4, 3, False, True),  # windowed SAM block with padding
        ((7, 6), 3, 2, True, False),  # TinyViT-style bias, windowed with padding
    ],
)
def test_coarse_map_equals_naive_dense_map(grid, window, grid_size, with_bias, with_rel_pos):
    capture = make_capture(2, 3, grid, window, with_bias=with_bias, with_rel_pos=with_rel_pos)
    expected = naive_coarse(naive_full_attention(capture), grid, grid_size)
    for chunk in (1, 5, 1000):
        coarse = coarse_attention_map(capture, grid_size, query_chunk=chunk)
        torch.testing.assert_close(coarse.double(), expected, atol=1e-5, rtol=1e-5)


def test_coarse_rows_sum_to_one():
    capture = make_capture(2, 4, (10, 9), window=4, with_rel_pos=True, seed=3)
    coarse = coarse_attention_map(capture, 4, query_chunk=7)
    assert coarse.shape == (2, 16, 16)
    torch.testing.assert_close(coarse.sum(-1), torch.ones(2, 16))


def test_grid_larger_than_tokens_is_rejected():
    with pytest.raises(ValueError, match="exceeds"):
        coarse_attention_map(make_capture(1, 1, (4, 4)), grid_size=5)


def test_windowed_support_covers_the_map_and_only_it():
    capture = make_capture(1, 2, (9, 9), window=3, with_bias=True)
    coarse = coarse_attention_map(capture, 3)
    support = coarse_attention_support(capture, 3)
    assert torch.equal(support, coarse[0] > 0)
    global_capture = make_capture(1, 2, (9, 9))
    assert coarse_attention_support(global_capture, 3).all()


def naive_kl(student: torch.Tensor, teacher: torch.Tensor) -> float:
    total, rows = 0.0, 0
    for b in range(student.shape[0]):
        for i in range(student.shape[1]):
            rows += 1
            for j in range(student.shape[2]):
                p, q = float(teacher[b, i, j]), float(student[b, i, j])
                if p > 0:
                    total += p * math.log(p / q)
    return total / rows


def test_attention_kl_reference_zero_and_positive():
    teacher = coarse_attention_map(make_capture(2, 2, (6, 6), seed=1), 3)
    student = coarse_attention_map(make_capture(2, 2, (6, 6), seed=2), 3)
    assert attention_kl(teacher, teacher).item() == 0.0
    value = attention_kl(student, teacher)
    assert value.item() > 0
    assert value.item() == pytest.approx(naive_kl(student, teacher), rel=1e-5)


def test_windowed_student_against_global_teacher_is_finite_and_zero_on_match():
    student_capture = make_capture(1, 2, (8, 8), window=4, seed=1)
    teacher = coarse_attention_map(make_capture(1, 2, (8, 8), seed=2), 4)
    student = coarse_attention_map(student_capture, 4)
    support = coarse_attention_support(student_capture, 4)
    value = attention_kl(student, teacher, support)
    assert torch.isfinite(value) and value.item() > 0
    restricted = teacher * support
    restricted = restricted / restricted.sum(-1, keepdim=True)
    assert attention_kl(restricted, teacher, support).item() == pytest.approx(0.0, abs=1e-6)


def test_gradients_reach_queries_keys_and_biases_through_chunks():
    capture = make_capture(1, 2, (6, 5), window=4, with_rel_pos=True, requires_grad=True)
    teacher = coarse_attention_map(make_capture(1, 2, (6, 5), seed=5), 2).detach()
    gradients = []
    for chunk in (3, 1000):
        for tensor in (capture.query, capture.key, capture.rel_pos_h):
            tensor.grad = None
        attention_kl(coarse_attention_map(capture, 2, chunk), teacher).backward()
        gradients.append([capture.query.grad.clone(), capture.key.grad.clone()])
        assert capture.rel_pos_h.grad is not None and capture.rel_pos_h.grad.abs().sum() > 0
    for chunked, whole in zip(*gradients, strict=True):
        assert chunked.abs().sum() > 0
        torch.testing.assert_close(chunked, whole)
