from __future__ import annotations

import pytest
import torch
from segment_anything import sam_model_registry
from segment_anything.modeling import ImageEncoderViT, Sam

from samkd.models import (
    MODEL_TYPES,
    STUDENT_TYPES,
    TEACHER_TYPES,
    build_sam,
    default_image_size,
    describe_model_types,
    model_type_info,
)

FULL_TEACHERS = ("vit_b", "vit_l", "vit_h")
PRESETS = ("vit_mini", "vit_t_mini")
BOX = (20.0, 30.0, 200.0, 180.0)


def layout(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


SAM2_TYPES = tuple(
    f"{version}_hiera_{size}" for version in ("sam2.1", "sam2") for size in ("t", "s", "b+", "l")
)


def test_model_types() -> None:
    sam1 = ("vit_b", "vit_l", "vit_h", "vit_t", "vit_mini", "vit_t_mini")
    assert (*sam1, *SAM2_TYPES, "hiera_mini") == MODEL_TYPES
    assert set(TEACHER_TYPES) == {"vit_b", "vit_l", "vit_h", "vit_mini", *SAM2_TYPES, "hiera_mini"}
    assert set(STUDENT_TYPES) == {"vit_t", "vit_t_mini"}
    assert default_image_size("vit_h") == 1024
    assert default_image_size("vit_t_mini") == 256
    table = describe_model_types().splitlines()
    assert [line.split()[0] for line in table] == list(MODEL_TYPES)


def test_unknown_model_type_lists_valid_ones() -> None:
    with pytest.raises(ValueError, match="unknown model type 'vit_x'") as error:
        build_sam("vit_x")
    message = str(error.value)
    assert "\n" not in message
    assert all(name in message for name in MODEL_TYPES)


@pytest.mark.parametrize("image_size", [100, 0, 1000])
def test_image_size_must_be_multiple_of_64(image_size: int) -> None:
    with pytest.raises(ValueError, match="multiple of 64"):
        build_sam("vit_t_mini", image_size=image_size)


@pytest.mark.parametrize("model_type", FULL_TEACHERS)
def test_teacher_matches_segment_anything_on_meta(model_type: str) -> None:
    ours = build_sam(model_type, device="meta")
    with torch.device("meta"):
        official = sam_model_registry[model_type]()
    assert isinstance(ours, Sam)
    assert isinstance(ours.image_encoder, ImageEncoderViT)
    assert ours.device.type == "meta"
    assert layout(ours) == layout(official)


# Building a SAM 2 type takes a second or two even on the meta device: the full sizes are
# checked in the slow run.
@pytest.mark.parametrize(
    "model_type",
    [
        *(name for name in MODEL_TYPES if name not in SAM2_TYPES),
        *(pytest.param(name, marks=pytest.mark.slow) for name in SAM2_TYPES),
    ],
)
def test_documented_parameter_counts(model_type: str) -> None:
    if model_type_info(model_type).sam2 is not None:
        pytest.importorskip("sam2")
    model = build_sam(model_type, device="meta")
    num_params = sum(p.numel() for p in model.parameters())
    assert model_type_info(model_type).num_params == f"{num_params / 1e6:.1f}M"


def test_teacher_sizes_follow_image_size() -> None:
    model = build_sam("vit_b", image_size=512, device="meta")
    encoder = model.image_encoder
    assert encoder.pos_embed.shape == (1, 32, 32, 768)
    assert encoder.blocks[2].attn.rel_pos_h.shape == (63, 64)  # global block
    assert encoder.blocks[0].attn.rel_pos_h.shape == (27, 64)  # 14 x 14 windows
    assert model.prompt_encoder.image_embedding_size == (32, 32)
    assert model.prompt_encoder.input_image_size == (512, 512)


@pytest.mark.parametrize(
    ("model_type", "image_size"),
    [
        ("vit_t_mini", 256),
        ("vit_t_mini", 320),
        ("vit_t_mini", 512),
        ("vit_mini", 256),
        ("vit_mini", 320),
        ("vit_t", 512),
    ],
)
def test_forward_shapes(model_type: str, image_size: int, predict_masks) -> None:
    model = build_sam(model_type, image_size=image_size)
    grid = image_size // 16
    with torch.no_grad():
        embedding, masks, iou = predict_masks(model, torch.randn(1, 3, image_size, image_size), BOX)
    assert embedding.shape == (1, 256, grid, grid)
    assert masks.shape == (1, 3, 4 * grid, 4 * grid)
    assert iou.shape == (1, 3)


def test_end_to_end_sam_forward() -> None:
    model = build_sam("vit_t_mini", image_size=320)
    batch = [
        {
            "image": torch.rand(3, 320, 240) * 255,
            "original_size": (400, 300),
            "boxes": torch.tensor([BOX]),
        }
    ]
    (result,) = model(batch, multimask_output=False)
    assert result["masks"].shape == (1, 1, 400, 300)


def test_gradient_checkpointing_flag_reaches_encoders() -> None:
    for model_type in PRESETS:
        model = build_sam(model_type, gradient_checkpointing=True)
        assert model.image_encoder.gradient_checkpointing
        model.image_encoder.set_gradient_checkpointing(False)
        assert not model.image_encoder.gradient_checkpointing


def test_builds_in_eval_mode_on_requested_device() -> None:
    model = build_sam("vit_t_mini", device="cpu")
    assert not model.training
    assert model.device == torch.device("cpu")
    with pytest.raises(ValueError, match="meta"):
        build_sam("vit_t_mini", device="meta", checkpoint="weights.pt")
