from __future__ import annotations

import pytest
import torch
from torch import nn

from samkd.distill.adapters import (
    FeatureAdapter,
    adapter_key,
    build_adapters,
    feature_shapes,
)
from samkd.distill.pairs import default_attention_pairs, default_encoder_pairs
from samkd.settings import TapPair


def test_identity_when_shapes_match_and_adapter_otherwise():
    pairs = [
        TapPair(student="encoder.embed", teacher="encoder.embed"),
        TapPair(student="encoder.block.9", teacher="encoder.block.31"),
    ]
    student_shapes = {"encoder.embed": (256, 64, 64), "encoder.block.9": (320, 64, 64)}
    teacher_shapes = {"encoder.embed": (256, 64, 64), "encoder.block.31": (1280, 64, 64)}
    adapters = build_adapters(pairs, student_shapes, teacher_shapes)
    assert isinstance(adapters[adapter_key(pairs[0])], nn.Identity)
    adapter = adapters["encoder_block_9__encoder_block_31"]
    assert isinstance(adapter, FeatureAdapter)
    assert adapter(torch.zeros(1, 320, 64, 64)).shape == (1, 1280, 64, 64)


@pytest.mark.parametrize("student_size, teacher_size", [(4, 8), (8, 4), (5, 5)])
def test_adapter_maps_channels_and_grid(student_size, teacher_size):
    adapter = FeatureAdapter((3, student_size, student_size), (6, teacher_size, teacher_size))
    features = torch.randn(2, 3, student_size, student_size)
    out = adapter(features)
    assert out.shape == (2, 6, teacher_size, teacher_size)
    # the conv and the resize commute: compare with the other order
    conv = adapter.project
    assert isinstance(conv, nn.Conv2d)
    other = (
        conv(adapter.resize(features)) if adapter.project_first else adapter.resize(conv(features))
    )
    torch.testing.assert_close(out, other, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="adapter built for"):
        adapter(torch.randn(2, 4, student_size, student_size))


def test_missing_shape_is_named():
    with pytest.raises(KeyError, match="encoder.block.1"):
        build_adapters([TapPair(student="encoder.block.1", teacher="encoder.embed")], {}, {})


def test_feature_shapes_drops_batch():
    assert feature_shapes({"encoder.embed": torch.zeros(2, 8, 4, 4)}) == {
        "encoder.embed": (8, 4, 4)
    }


@pytest.mark.parametrize(
    "student, teacher, expected",
    [
        ("vit_t", "vit_b", ("encoder.qk.9", "encoder.qk.11")),
        ("vit_t", "vit_l", ("encoder.qk.9", "encoder.qk.23")),
        ("vit_t", "vit_h", ("encoder.qk.9", "encoder.qk.31")),
        ("vit_t", "vit_t", ("encoder.qk.9", "encoder.qk.9")),
        ("vit_t_mini", "vit_mini", ("encoder.qk.3", "encoder.qk.3")),
    ],
)
def test_default_pairs(student, teacher, expected):
    assert default_encoder_pairs(student, teacher) == [
        TapPair(student="encoder.embed", teacher="encoder.embed")
    ]
    (pair,) = default_attention_pairs(student, teacher)
    assert (pair.student, pair.teacher) == expected
