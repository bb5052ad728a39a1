"""The teacher fast path (SDPA attention) against the unmodified segment-anything encoder.

Float32 on the CPU; outputs must agree within `FLOAT32_TOLERANCE` (max abs difference).
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from segment_anything.modeling import Sam
from segment_anything.modeling.image_encoder import Attention as SamAttention

import samkd.models.teacher
from samkd.demo.shapes import write_shapes_dataset
from samkd.extract import run_extract
from samkd.models import (
    AttentionCapture,
    CheckpointedImageEncoderViT,
    FastAttentionHandle,
    build_prompt_decoder,
    build_sam,
    capture_taps,
    enable_fast_attention,
    fast_attention,
    fast_teacher_enabled,
    optimize_teacher,
    save_state_dict,
)
from samkd.models.fast_attention import FLOAT32_TOLERANCE, sdpa_attention
from samkd.models.registry import PIXEL_MEAN, PIXEL_STD
from samkd.settings import TeacherSettings, load_settings
from samkd.train.teachers import load_online_teacher
from tests.models.conftest import randomize_


def windowed_vit(image_size: int) -> Sam:
    """Windowed blocks around a global one, relative positions, window 7: at 320 px the
    20 x 20 grid is padded to 21 x 21 in the windowed blocks."""
    encoder = CheckpointedImageEncoderViT(
        img_size=image_size,
        patch_size=16,
        embed_dim=64,
        depth=3,
        num_heads=2,
        window_size=7,
        global_attn_indexes=(1,),
        out_chans=32,
    )
    prompt_encoder, mask_decoder = build_prompt_decoder(image_size)
    sam = Sam(encoder, prompt_encoder, mask_decoder, list(PIXEL_MEAN), list(PIXEL_STD))
    return randomize_(sam, seed=4).eval()


def images(size: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def max_diff(left: torch.Tensor, right: torch.Tensor) -> float:
    return (left - right).abs().max().item()


MODELS = {
    "vit_mini_256": (lambda: randomize_(build_sam("vit_mini"), seed=1), 256),
    "windowed_256": (lambda: windowed_vit(256), 256),
    "windowed_320": (lambda: windowed_vit(320), 320),
}


@pytest.mark.parametrize("name", list(MODELS))
@torch.inference_mode()
def test_outputs_match_the_reference(name: str) -> None:
    build, size = MODELS[name]
    model = build()
    batch = images(size)
    reference = model.image_encoder(batch)
    with fast_attention(model.image_encoder) as handle:
        assert handle.attention_modules == len(model.image_encoder.blocks)
        fast = model.image_encoder(batch)
    assert fast.shape == reference.shape
    assert max_diff(fast, reference) < FLOAT32_TOLERANCE
    assert reference.abs().max() > 0.1  # a real comparison, not of zeros


@torch.inference_mode()
def test_mask_chunks_give_the_unchunked_attention() -> None:
    """A budget of one window's mask makes every window its own chunk."""
    generator = torch.Generator().manual_seed(5)
    windows, rows, cols, heads, head_dim = 5, 4, 3, 2, 8
    qkv = torch.randn(windows, rows, cols, 3 * heads * head_dim, generator=generator)
    rel_pos_h = torch.randn(2 * rows - 1, head_dim, generator=generator)
    rel_pos_w = torch.randn(2 * cols - 1, head_dim, generator=generator)
    whole = sdpa_attention(qkv, heads, 0.3, rel_pos_h, rel_pos_w)
    one_mask = heads * (rows * cols) ** 2 * qkv.element_size()
    for budget in (one_mask, 2 * one_mask + 1):
        chunked = sdpa_attention(qkv, heads, 0.3, rel_pos_h, rel_pos_w, mask_budget_bytes=budget)
        assert torch.allclose(chunked, whole, atol=1e-6)
    assert whole.shape == (windows, rows, cols, heads * head_dim)


@pytest.mark.parametrize("name", ["vit_mini_256", "windowed_320"])
@torch.inference_mode()
def test_taps_match_the_reference(name: str) -> None:
    build, size = MODELS[name]
    model = build()
    depth = len(model.image_encoder.blocks)
    names = [f"encoder.qk.{i}" for i in range(depth)] + [f"encoder.block.{i}" for i in range(depth)]
    batch = images(size)
    with capture_taps(model, names) as captured:
        model.image_encoder(batch)
        reference = dict(captured)
    with optimize_teacher(model), capture_taps(model, names) as captured:
        model.image_encoder(batch)
        fast = dict(captured)
    assert set(fast) == set(names)
    for tap in names:
        expected, value = reference[tap], fast[tap]
        if isinstance(expected, AttentionCapture):
            assert isinstance(value, AttentionCapture)
            assert (value.grid, value.window, value.padded_grid) == (
                expected.grid,
                expected.window,
                expected.padded_grid,
            )
            pairs = [(value.query, expected.query), (value.key, expected.key)]
            assert value.rel_pos_h is not None and expected.rel_pos_h is not None
            assert value.rel_pos_w is not None and expected.rel_pos_w is not None
            pairs += [(value.rel_pos_h, expected.rel_pos_h), (value.rel_pos_w, expected.rel_pos_w)]
            for fast_value, expected_value in pairs:
                assert max_diff(fast_value, expected_value) < FLOAT32_TOLERANCE, tap
        else:
            assert isinstance(value, torch.Tensor) and isinstance(expected, torch.Tensor)
            assert max_diff(value, expected) < FLOAT32_TOLERANCE, tap
    # The first block's queries come before any attention: identical bit for bit.
    first, first_reference = fast["encoder.qk.0"], reference["encoder.qk.0"]
    assert isinstance(first, AttentionCapture) and isinstance(first_reference, AttentionCapture)
    assert torch.equal(first.query, first_reference.query)


@torch.inference_mode()
def test_disable_restores_the_reference_module() -> None:
    model = randomize_(build_sam("vit_mini"), seed=1)
    encoder = model.image_encoder
    batch = images(256, batch=1)
    reference = encoder(batch)
    keys = list(model.state_dict())
    handle = enable_fast_attention(encoder)
    attention = [m for m in encoder.modules() if isinstance(m, SamAttention)]
    assert handle.active and all("forward" in m.__dict__ for m in attention)
    assert list(model.state_dict()) == keys
    assert not torch.equal(encoder(batch), reference)  # another kernel ran
    handle.remove()
    handle.remove()
    assert not handle.active and all("forward" not in m.__dict__ for m in attention)
    assert torch.equal(encoder(batch), reference)
    with pytest.raises(RuntimeError, match="boom"), fast_attention(encoder):
        raise RuntimeError("boom")
    assert all("forward" not in m.__dict__ for m in attention)
    assert torch.equal(encoder(batch), reference)


@torch.inference_mode()
def test_compiled_fast_path_matches_the_reference() -> None:
    model = windowed_vit(320)
    batch = images(320)
    with capture_taps(model, ["encoder.qk.1"]) as captured:
        reference = model.image_encoder(batch)
        reference_query = captured.attention("encoder.qk.1").query
    with optimize_teacher(model, compile=True) as handle:
        assert handle.compiled
        with capture_taps(model, ["encoder.qk.1"]) as captured:
            fast = model.image_encoder(batch)
            fast_query = captured.attention("encoder.qk.1").query
    assert max_diff(fast, reference) < FLOAT32_TOLERANCE
    assert max_diff(fast_query, reference_query) < FLOAT32_TOLERANCE
    assert not handle.active


def test_students_are_refused() -> None:
    with pytest.raises(TypeError, match="SAM ViT teachers only"):
        enable_fast_attention(build_sam("vit_t_mini", device="meta").image_encoder)


def test_auto_is_on_for_cuda_only() -> None:
    assert fast_teacher_enabled("auto", "cuda:1")
    assert not fast_teacher_enabled("auto", torch.device("cpu"))
    assert fast_teacher_enabled("on", "cpu")
    assert not fast_teacher_enabled("off", "cuda")


def test_bf16_autocast_stays_close() -> None:
    model = randomize_(build_sam("vit_mini"), seed=1)
    batch = images(256, batch=1)
    with torch.inference_mode():
        reference = model.image_encoder(batch)
        with torch.autocast("cpu", dtype=torch.bfloat16), fast_attention(model.image_encoder):
            fast = model.image_encoder(batch).float()
    # bf16 keeps 8 bits of mantissa: a few percent of the embedding's range.
    assert max_diff(fast, reference) < 0.05 * reference.abs().max().item()


def test_online_teacher_follows_the_setting() -> None:
    entry = TeacherSettings(name="t", model_type="vit_mini")
    cpu = torch.device("cpu")
    for mode, expected in (("auto", False), ("off", False), ("on", True)):
        teacher = load_online_teacher(entry, 256, ["encoder.embed"], cpu, fast=mode)  # type: ignore[arg-type]
        assert teacher.model is not None
        patched = [
            "forward" in m.__dict__
            for m in teacher.model.image_encoder.modules()
            if isinstance(m, SamAttention)
        ]
        assert patched and all(value is expected for value in patched), mode


TAPS = ["encoder.embed", "encoder.qk.1", "encoder.qk.2", "encoder.block.1"]


def test_extraction_on_matches_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = write_shapes_dataset(tmp_path / "shapes", 3, (96, 128))
    checkpoint = tmp_path / "teacher.pt"
    save_state_dict(randomize_(build_sam("vit_mini"), seed=5), checkpoint)
    optimized: list[bool] = []

    def spy(model: Sam, *, compile: bool = False) -> FastAttentionHandle:
        optimized.append(compile)
        return optimize_teacher(model, compile=compile)

    monkeypatch.setattr(samkd.models.teacher, "optimize_teacher", spy)
    stored = {}
    for mode in ("off", "on"):
        output = tmp_path / f"features-{mode}.h5"
        settings = load_settings(
            None,
            [
                f"data.train={data}",
                "data.num_workers=0",
                "student.model_type=vit_t_mini",
                f"teachers=[{{name: t, model_type: vit_mini, checkpoint: {checkpoint}}}]",
                f"extract.output={output}",
                f"extract.taps={TAPS}",
                "extract.dtype=float32",
                "extract.batch_size=2",
                "extract.device=cpu",
                f"extract.fast_teacher={mode}",
            ],
            environ={},
        )
        assert settings.extract.fast_teacher == mode
        run_extract(settings)
        assert optimized == ([False] if mode == "on" else [])
        with h5py.File(output, "r") as handle:
            stored[mode] = {tap: handle[f"teachers/t/taps/{tap}"][()] for tap in TAPS}
    for tap in TAPS:
        on, off = stored["on"][tap], stored["off"][tap]
        assert on.shape == off.shape and on.shape[0] == 3
        assert np.abs(on - off).max() < FLOAT32_TOLERANCE, tap
