"""Every loss term under bf16 autocast equals its float32 value.

Autocast overrides a term's own `.float()` casts (matmul, einsum and the like go back to
bfloat16), so the terms run with autocast off; see `samkd.distill.precision`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
import torch
from segment_anything.modeling import Sam

from samkd.distill.attention import attention_kl, coarse_attention_map, coarse_attention_support
from samkd.distill.decoder import cosine_distance, mask_logit_kl
from samkd.distill.encoder import encoder_kl, feature_mse
from samkd.distill.precision import float32_loss
from samkd.distill.rkd import (
    grid_patches,
    relational_embeddings,
    rkd_angle_loss,
    rkd_distance_loss,
    sample_positions,
    sampled_patches,
)
from samkd.models import AttentionCapture, build_sam, capture_taps
from samkd.train.task_loss import dice_loss, sigmoid_focal_loss

from ..models.conftest import randomize_

RELATIVE = 1e-3
IMAGE_SIZE = 128
GRID_SIZE = 4


def bf16_autocast() -> torch.autocast:
    return torch.autocast("cpu", dtype=torch.bfloat16)


def feature_pair(*shape: int, seed: int, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """A student feature and a teacher feature close to it, so the loss is a small difference."""
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(shape, generator=generator) * scale
    return student, student + 0.05 * scale * torch.randn(shape, generator=generator)


def mask_pair(*shape: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask logits and {0, 1} targets."""
    generator = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(shape, generator=generator)
    return logits, (torch.randn(shape, generator=generator) > 0).float()


def on_grid(loss: Callable[..., torch.Tensor], **kwargs) -> Callable[..., torch.Tensor]:
    return lambda s, t: loss(grid_patches(s, GRID_SIZE), grid_patches(t, GRID_SIZE), **kwargs)


POSITIONS = sample_positions(2, 64, 12, torch.Generator().manual_seed(0))

# name: (term of student and teacher, (student, teacher))
TERMS = {
    "encoder_mse": (feature_mse, feature_pair(2, 16, 8, 8, seed=0)),
    "encoder_kl_spatial": (
        lambda s, t: encoder_kl(s, t, 2.0, "spatial"),
        feature_pair(2, 16, 8, 8, seed=1, scale=3.0),
    ),
    "encoder_kl_channel": (
        lambda s, t: encoder_kl(s, t, 2.0, "channel"),
        feature_pair(2, 16, 8, 8, seed=2, scale=3.0),
    ),
    "decoder_mse": (feature_mse, feature_pair(2, 8, 16, 16, seed=3)),
    "decoder_cosine": (cosine_distance, feature_pair(2, 8, 16, 16, seed=4)),
    "decoder_kl": (
        lambda s, t: mask_logit_kl(s, t, 2.0),
        feature_pair(2, 3, 16, 16, seed=5, scale=4.0),
    ),
    "rkd_distance": (on_grid(rkd_distance_loss), feature_pair(2, 16, 8, 8, seed=6)),
    "rkd_distance_sampled": (
        lambda s, t: rkd_distance_loss(*(sampled_patches(x, POSITIONS) for x in (s, t))),
        feature_pair(2, 16, 8, 8, seed=7),
    ),
    "rkd_angle": (on_grid(rkd_angle_loss), feature_pair(2, 16, 8, 8, seed=8)),
    # A few vertices at a time: checkpointed, so the backward pass recomputes.
    "rkd_angle_chunked": (
        on_grid(rkd_angle_loss, chunk_elements=2 * 16 * 16 * 3),
        feature_pair(2, 16, 8, 8, seed=9),
    ),
    "rkd_angle_across_batch": (
        lambda s, t: rkd_angle_loss(
            relational_embeddings(grid_patches(s, 2), True),
            relational_embeddings(grid_patches(t, 2), True),
        ),
        feature_pair(4, 8, 8, 8, seed=10),
    ),
    "task_focal": (lambda s, t: sigmoid_focal_loss(s, t).mean(), mask_pair(2, 3, 16, 16, seed=11)),
    "task_dice": (lambda s, t: dice_loss(s, t).mean(), mask_pair(2, 3, 16, 16, seed=12)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32-in", "bf16-in"])
@pytest.mark.parametrize("name", list(TERMS))
def test_term_under_bf16_autocast_equals_float32(name: str, dtype: torch.dtype) -> None:
    term, (student, teacher) = TERMS[name]
    student, teacher = student.to(dtype), teacher.to(dtype)

    reference_student = student.clone().requires_grad_()
    expected = term(reference_student.float(), teacher.float())
    expected.backward()

    autocast_student = student.clone().requires_grad_()
    with bf16_autocast():
        value = term(autocast_student, teacher)
    value.backward()  # outside autocast, as in training

    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(expected.item(), rel=RELATIVE)
    assert reference_student.grad is not None and autocast_student.grad is not None
    assert autocast_student.grad.abs().sum() > 0
    scale = reference_student.grad.abs().max().item()
    torch.testing.assert_close(
        autocast_student.grad, reference_student.grad, rtol=RELATIVE, atol=RELATIVE * scale
    )


@pytest.mark.parametrize("name", list(TERMS))
def test_term_under_bf16_autocast_runs_on_meta(name: str) -> None:
    term, (student, teacher) = TERMS[name]
    student, teacher = (x.to("meta", torch.bfloat16) for x in (student, teacher))
    with bf16_autocast():
        value = term(student.requires_grad_(), teacher)
    assert value.device.type == "meta" and value.dtype == torch.float32


# Real captures, taken under autocast as in training: bfloat16 queries and keys.
CAPTURES = {
    "teacher-global": ("teacher", "encoder.qk.1"),  # SAM ViT, relative positions
    "teacher-windowed": ("teacher", "encoder.qk.0"),  # windowed and padded
    "student-windowed": ("student", "encoder.qk.0"),  # TinyViT attention biases
}


@pytest.fixture(scope="module")
def models() -> dict[str, Sam]:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return {
            "teacher": randomize_(build_sam("vit_mini", image_size=IMAGE_SIZE), seed=1),
            "student": randomize_(build_sam("vit_t_mini", image_size=IMAGE_SIZE), seed=2),
        }


def capture_under_autocast(model: Sam, tap: str, seed: int = 0) -> AttentionCapture:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    with bf16_autocast(), capture_taps(model, [tap]) as taps:
        model.image_encoder(images)
    capture = taps.attention(tap)
    assert capture.query.dtype == torch.bfloat16
    return capture


def as_float32(capture: AttentionCapture) -> AttentionCapture:
    """The same capture in float32: the reference the autocast path must match."""

    def cast(tensor: torch.Tensor | None) -> torch.Tensor | None:
        return None if tensor is None else tensor.float()

    return dataclasses.replace(
        capture,
        query=capture.query.float(),
        key=capture.key.float(),
        bias=cast(capture.bias),
        rel_pos_h=cast(capture.rel_pos_h),
        rel_pos_w=cast(capture.rel_pos_w),
    )


@pytest.mark.parametrize("name", list(CAPTURES))
def test_coarse_map_under_bf16_autocast_is_float32(models: dict[str, Sam], name: str) -> None:
    model, tap = CAPTURES[name]
    with torch.no_grad():
        capture = capture_under_autocast(models[model], tap)
        expected = coarse_attention_map(as_float32(capture), GRID_SIZE, query_chunk=16)
        with bf16_autocast():
            coarse = coarse_attention_map(capture, GRID_SIZE, query_chunk=16)
    assert coarse.dtype == torch.float32
    torch.testing.assert_close(coarse.sum(-1), torch.ones_like(coarse[..., 0]), atol=1e-5, rtol=0)
    torch.testing.assert_close(coarse, expected, atol=1e-6, rtol=1e-5)


def test_attention_kl_under_bf16_autocast_equals_float32(models: dict[str, Sam]) -> None:
    with torch.no_grad():
        teacher = capture_under_autocast(models["teacher"], "encoder.qk.1")
    student = capture_under_autocast(models["student"], "encoder.qk.0")
    assert student.query.requires_grad
    support = coarse_attention_support(student, GRID_SIZE)

    def loss(student: AttentionCapture, teacher: AttentionCapture) -> torch.Tensor:
        # Small chunks: the student's map is checkpointed chunk by chunk.
        student_map = coarse_attention_map(student, GRID_SIZE, query_chunk=16)
        return attention_kl(student_map, coarse_attention_map(teacher, GRID_SIZE), support)

    expected = loss(as_float32(student), as_float32(teacher))
    (expected_grad,) = torch.autograd.grad(expected, student.query, retain_graph=True)
    with bf16_autocast():
        value = loss(student, teacher)
    (grad,) = torch.autograd.grad(value, student.query)

    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(expected.item(), rel=RELATIVE)
    assert grad.abs().sum() > 0
    scale = expected_grad.abs().max().item()
    torch.testing.assert_close(grad, expected_grad, rtol=RELATIVE, atol=RELATIVE * scale)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_float32_loss_casts_half_inputs_and_restores_autocast(device: str) -> None:
    @float32_loss
    def product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        assert not torch.is_autocast_enabled("cpu")
        return a @ b

    half = torch.ones(2, 2, dtype=torch.bfloat16, device=device)
    double = torch.ones(2, 2, dtype=torch.float64, device=device)
    with bf16_autocast():
        assert product(half, b=half).dtype == torch.float32
        assert product(double, b=double).dtype == torch.float64  # never cast down
        assert torch.is_autocast_enabled("cpu")
