from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from segment_anything.modeling import Sam
from torch import nn

from samkd.models import AttentionCapture, TapError, available_taps, build_sam, capture_taps
from samkd.models.tiny_vit import TinyViTBlock

BOX = (20.0, 30.0, 200.0, 180.0)
DECODER_TAPS = ["decoder.upscaled", "decoder.mask_logits", "decoder.iou"]


def test_available_taps() -> None:
    teacher = build_sam("vit_mini", device="meta")
    assert available_taps(teacher) == (
        ["encoder.embed"]
        + [f"encoder.block.{i}" for i in range(4)]
        + [f"encoder.qk.{i}" for i in range(4)]
        + DECODER_TAPS
    )
    student = build_sam("vit_t", device="meta")
    assert [t for t in available_taps(student) if t.startswith("encoder.block.")] == [
        f"encoder.block.{i}" for i in range(4)
    ]
    assert [t for t in available_taps(student) if t.startswith("encoder.qk.")] == [
        f"encoder.qk.{i}" for i in range(10)
    ]
    assert "encoder.qk.31" in available_taps(build_sam("vit_h", device="meta"))


def test_unknown_tap_lists_valid_ones(mini_student: Sam) -> None:
    names = ["encoder.embed", "encoder.block.9"]
    unknown = "unknown tap 'encoder.block.9'"
    with pytest.raises(TapError, match=unknown) as error, capture_taps(mini_student, names):
        pass
    message = str(error.value)
    assert "\n" not in message
    assert "encoder.qk.3" in message
    assert isinstance(error.value, ValueError)
    assert hook_count(mini_student) == 0


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_hooks_are_removed_on_exit_and_on_error(mini_teacher: Sam) -> None:
    names = available_taps(mini_teacher)
    with capture_taps(mini_teacher, names):
        assert hook_count(mini_teacher) > 0
    assert hook_count(mini_teacher) == 0
    with pytest.raises(RuntimeError, match="boom"), capture_taps(mini_teacher, names):
        raise RuntimeError("boom")
    assert hook_count(mini_teacher) == 0


@pytest.mark.parametrize(
    ("model_type", "block_shapes"),
    [
        ("vit_mini", [(2, 192, 16, 16)] * 4),
        ("vit_t_mini", [(2, 64, 32, 32), (2, 96, 16, 16), (2, 128, 16, 16), (2, 128, 16, 16)]),
    ],
)
def test_tap_shapes(model_type: str, block_shapes: list[tuple[int, ...]], predict_masks) -> None:
    model = build_sam(model_type)
    images = torch.randn(2, 3, 256, 256)
    with capture_taps(model, available_taps(model)) as taps:
        with torch.no_grad():
            embedding, masks, iou = predict_masks(model, images, BOX)
        assert set(taps) == set(available_taps(model))
        assert taps.tensor("encoder.embed") is embedding
        for i, shape in enumerate(block_shapes):
            assert taps.tensor(f"encoder.block.{i}").shape == shape
        assert taps.tensor("encoder.block.3").shape[-2:] == (16, 16)
        # The decoder repeats the image embeddings per prompt; one box per image here.
        assert taps.tensor("decoder.upscaled").shape == (2, 32, 64, 64)
        assert taps.tensor("decoder.mask_logits") is masks
        assert taps.tensor("decoder.iou") is iou
        assert isinstance(taps.attention("encoder.qk.0"), AttentionCapture)
        with pytest.raises(TypeError):
            taps.attention("encoder.embed")
        taps.clear()
        with pytest.raises(KeyError, match="not been filled"):
            taps["encoder.embed"]


def test_student_taps_keep_the_graph(mini_student: Sam) -> None:
    names = ["encoder.block.1", "encoder.qk.2"]
    with capture_taps(mini_student, names) as taps:
        mini_student.image_encoder(torch.randn(1, 3, 256, 256))
    block = taps.tensor("encoder.block.1")
    capture = taps.attention("encoder.qk.2")
    assert block.requires_grad and capture.query.requires_grad and capture.bias is not None
    (block.mean() + capture.logits().mean()).backward()
    assert mini_student.image_encoder.layers[1].blocks[0].attn.qkv.weight.grad is not None
    assert mini_student.image_encoder.layers[2].blocks[0].attn.attention_biases.grad is not None


def test_taps_inside_checkpointed_blocks_carry_gradients(mini_student: Sam) -> None:
    encoder = mini_student.image_encoder.train()
    images = torch.randn(1, 3, 256, 256)
    grads = []
    for checkpointed in (False, True):
        encoder.set_gradient_checkpointing(checkpointed)
        encoder.zero_grad()
        with capture_taps(mini_student, ["encoder.qk.1"]) as taps:
            encoder(images)
            taps.attention("encoder.qk.1").logits().square().mean().backward()
        grads.append(encoder.layers[2].blocks[0].attn.qkv.weight.grad.clone())
    torch.testing.assert_close(grads[1], grads[0])


@contextmanager
def attention_internals(attention: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Output of an attention module's qkv projection and the input of its output projection."""
    seen: dict[str, torch.Tensor] = {}
    handles = [
        attention.qkv.register_forward_hook(lambda m, i, o: seen.__setitem__("qkv", o)),
        attention.proj.register_forward_pre_hook(lambda m, i: seen.__setitem__("mixed", i[0])),
    ]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def mix_values(capture: AttentionCapture, values: torch.Tensor) -> torch.Tensor:
    """softmax(logits) @ values, (B * nW) x heads x T x head_dim -> (B * nW) x T x C."""
    mixed = capture.logits().softmax(dim=-1) @ values
    return mixed.transpose(1, 2).flatten(2)


@pytest.mark.parametrize(
    ("block_index", "grid", "window", "padded_grid"),
    [(1, (20, 20), 0, (20, 20)), (0, (20, 20), 6, (24, 24))],
    ids=["global", "windowed-padded"],
)
def test_vit_attention_capture_rebuilds_probabilities(
    block_index: int,
    grid: tuple[int, int],
    window: int,
    padded_grid: tuple[int, int],
    randomize,
) -> None:
    model = randomize(build_sam("vit_mini", image_size=320), seed=4)
    attention = model.image_encoder.blocks[block_index].attn
    name = f"encoder.qk.{block_index}"
    images = torch.randn(2, 3, 320, 320)
    with capture_taps(model, [name]) as taps, attention_internals(attention) as seen:
        model.image_encoder(images)
    capture = taps.attention(name)
    assert (capture.grid, capture.window, capture.padded_grid) == (grid, window, padded_grid)
    assert capture.batch_size == 2 and capture.num_heads == 3
    assert capture.rel_pos_h is not None and capture.bias is None

    windows, rows, cols, channels = seen["qkv"].shape
    values = seen["qkv"].reshape(windows, rows * cols, 3, 3, -1)[:, :, 2].transpose(1, 2)
    expected = seen["mixed"].reshape(windows, rows * cols, channels // 3)
    torch.testing.assert_close(mix_values(capture, values), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(capture.logits(5, 9), capture.logits()[:, :, 5:9])


def test_tiny_vit_attention_capture_rebuilds_probabilities(mini_student: Sam) -> None:
    attention_blocks = [
        m for m in mini_student.image_encoder.modules() if isinstance(m, TinyViTBlock)
    ]
    attention = attention_blocks[0].attn
    images = torch.randn(2, 3, 256, 256)
    with (
        capture_taps(mini_student, ["encoder.qk.0"]) as taps,
        attention_internals(attention) as seen,
    ):
        mini_student.image_encoder(images)
    capture = taps.attention("encoder.qk.0")
    # Stage 1 of a 256 px image: 32 x 32 tokens in 7 x 7 windows, padded to 35 x 35.
    assert (capture.grid, capture.window, capture.padded_grid) == ((32, 32), 7, (35, 35))
    assert capture.batch_size == 2 and capture.num_windows == 25
    assert capture.bias is not None and capture.bias.shape == (2, 49, 49)
    assert capture.rel_pos_h is None

    _, _, values = attention.split_qkv(seen["qkv"])
    torch.testing.assert_close(mix_values(capture, values), seen["mixed"], rtol=1e-4, atol=1e-5)
