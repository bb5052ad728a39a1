"""Encoder and decoder terms against slow element-by-element references."""

from __future__ import annotations

import math

import pytest
import torch

from samkd.distill.decoder import cosine_distance, mask_logit_kl
from samkd.distill.encoder import encoder_kl, feature_mse


def softmax(values: list[float]) -> list[float]:
    peak = max(values)
    exps = [math.exp(v - peak) for v in values]
    return [e / sum(exps) for e in exps]


def kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True))


def reference_encoder_kl(student, teacher, temperature, axis):
    batch, channels, height, width = student.shape
    positions = [(y, x) for y in range(height) for x in range(width)]
    total, count = 0.0, 0
    for b in range(batch):
        if axis == "spatial":
            for c in range(channels):
                s = softmax([float(student[b, c, y, x]) / temperature for y, x in positions])
                t = softmax([float(teacher[b, c, y, x]) / temperature for y, x in positions])
                total, count = total + kl(t, s), count + 1
        else:
            for y, x in positions:
                s = softmax([float(student[b, c, y, x]) / temperature for c in range(channels)])
                t = softmax([float(teacher[b, c, y, x]) / temperature for c in range(channels)])
                total, count = total + kl(t, s), count + 1
    return temperature**2 * total / count


@pytest.fixture
def features():
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(2, 3, 4, 5, generator=generator)
    teacher = torch.randn(2, 3, 4, 5, generator=generator)
    return student, teacher


def test_feature_mse(features):
    student, teacher = features
    expected = sum(
        float(a - b) ** 2 for a, b in zip(student.flatten(), teacher.flatten(), strict=True)
    )
    assert feature_mse(student, teacher).item() == pytest.approx(expected / student.numel())
    assert feature_mse(teacher, teacher).item() == 0.0


@pytest.mark.parametrize("axis", ["spatial", "channel"])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_encoder_kl(features, axis, temperature):
    student, teacher = features
    value = encoder_kl(student, teacher, temperature, axis)
    expected = reference_encoder_kl(student, teacher, temperature, axis)
    assert value.item() == pytest.approx(expected, rel=1e-5)
    assert value.item() > 0
    assert encoder_kl(teacher, teacher, temperature, axis).item() == 0.0


def test_mismatched_shapes_are_rejected(features):
    student, teacher = features
    with pytest.raises(ValueError, match="does not match"):
        feature_mse(student, teacher[:, :2])
    with pytest.raises(ValueError, match="does not match"):
        encoder_kl(student.permute(0, 2, 3, 1), teacher)


def test_cosine_distance(features):
    student, teacher = features
    batch, _, height, width = student.shape
    total = 0.0
    for b in range(batch):
        for y in range(height):
            for x in range(width):
                s, t = student[b, :, y, x].tolist(), teacher[b, :, y, x].tolist()
                dot = sum(a * c for a, c in zip(s, t, strict=True))
                norms = math.sqrt(sum(a * a for a in s)) * math.sqrt(sum(c * c for c in t))
                total += 1 - dot / norms
    expected = total / (batch * height * width)
    assert cosine_distance(student, teacher).item() == pytest.approx(expected, rel=1e-5)
    assert cosine_distance(teacher, teacher).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_mask_logit_kl(features, temperature):
    student, teacher = (f * 4 for f in features)
    total = 0.0
    for s, t in zip(student.flatten().tolist(), teacher.flatten().tolist(), strict=True):
        ps, pt = 1 / (1 + math.exp(-s / temperature)), 1 / (1 + math.exp(-t / temperature))
        total += pt * math.log(pt / ps) + (1 - pt) * math.log((1 - pt) / (1 - ps))
    expected = temperature**2 * total / student.numel()
    value = mask_logit_kl(student, teacher, temperature)
    assert value.item() == pytest.approx(expected, rel=1e-5)
    assert mask_logit_kl(teacher, teacher, temperature).item() == 0.0


def test_mask_logit_kl_is_finite_for_saturated_logits():
    student = torch.tensor([[[[-200.0, 200.0]]]], requires_grad=True)
    teacher = torch.tensor([[[[200.0, -200.0]]]])
    value = mask_logit_kl(student, teacher)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(student.grad).all()
