"""Builders for the SAM teachers and MobileSAM students, by model type.

Every model is a `segment_anything.modeling.Sam` with SAM's prompt encoder and mask decoder
(prompt embedding dim 256), so image embeddings are `B x 256 x S/16 x S/16` for image size `S`
on every model type.

| type       | role    | params | image size | image encoder                                    |
|------------|---------|--------|------------|--------------------------------------------------|
| vit_b      | teacher | 93.7M  | 1024       | SAM ViT-B: 768 wide, 12 blocks                   |
| vit_l      | teacher | 312.3M | 1024       | SAM ViT-L: 1024 wide, 24 blocks                  |
| vit_h      | teacher | 641.1M | 1024       | SAM ViT-H: 1280 wide, 32 blocks                  |
| vit_t      | student | 10.1M  | 1024       | MobileSAM TinyViT-5M                             |
| vit_mini   | teacher | 6.7M   | 256        | SAM ViT, 192 wide, 4 blocks (tests, CPU demos)   |
| vit_t_mini | student | 5.2M   | 256        | TinyViT, 32-128 wide, 5 blocks (tests, demos)    |

Most of the mini models' parameters are the full-size mask decoder (4.1M).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from os import PathLike

import torch
from segment_anything.modeling import MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from torch import nn

from samkd.models.checkpoint import SkippedInit, load_weights
from samkd.models.image_encoder import CheckpointedImageEncoderViT
from samkd.models.tiny_vit import TinyViT

PATCH_SIZE = 16
PROMPT_EMBED_DIM = 256
# State-dict prefixes of the prompt encoder and mask decoder (the same on every model type).
DECODER_PREFIXES = ("prompt_encoder.", "mask_decoder.")
# Image sizes must be multiples of this so every model's token grids are whole.
IMAGE_SIZE_MULTIPLE = 64
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)

TEACHER = "teacher"
STUDENT = "student"

EncoderBuilder = Callable[[int, bool], nn.Module]


@dataclass(frozen=True)
class ModelType:
    """One entry of the registry; `build_encoder(image_size, gradient_checkpointing)`."""

    name: str
    role: str
    default_image_size: int
    num_params: str
    summary: str
    build_encoder: EncoderBuilder


def _sam_vit(
    embed_dim: int,
    depth: int,
    num_heads: int,
    global_attn_indexes: tuple[int, ...],
    window_size: int = 14,
) -> EncoderBuilder:
    def build(image_size: int, gradient_checkpointing: bool) -> nn.Module:
        return CheckpointedImageEncoderViT(
            img_size=image_size,
            patch_size=PATCH_SIZE,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            window_size=window_size,
            global_attn_indexes=global_attn_indexes,
            out_chans=PROMPT_EMBED_DIM,
            gradient_checkpointing=gradient_checkpointing,
        )

    return build


def _tiny_vit(
    embed_dims: tuple[int, ...],
    depths: tuple[int, ...],
    num_heads: tuple[int, ...],
    num_classes: int,
) -> EncoderBuilder:
    def build(image_size: int, gradient_checkpointing: bool) -> nn.Module:
        return TinyViT(
            img_size=image_size,
            embed_dims=embed_dims,
            depths=depths,
            num_heads=num_heads,
            window_sizes=(7, 7, 14, 7),
            merge_strides=(2, 2, 1),
            num_classes=num_classes,
            out_chans=PROMPT_EMBED_DIM,
            gradient_checkpointing=gradient_checkpointing,
        )

    return build


_REGISTRY: dict[str, ModelType] = {
    spec.name: spec
    for spec in (
        ModelType(
            "vit_b", TEACHER, 1024, "93.7M", "SAM ViT-B", _sam_vit(768, 12, 12, (2, 5, 8, 11))
        ),
        ModelType(
            "vit_l", TEACHER, 1024, "312.3M", "SAM ViT-L", _sam_vit(1024, 24, 16, (5, 11, 17, 23))
        ),
        ModelType(
            "vit_h", TEACHER, 1024, "641.1M", "SAM ViT-H", _sam_vit(1280, 32, 16, (7, 15, 23, 31))
        ),
        ModelType(
            "vit_t",
            STUDENT,
            1024,
            "10.1M",
            "MobileSAM (TinyViT-5M encoder)",
            _tiny_vit((64, 128, 160, 320), (2, 2, 6, 2), (2, 4, 5, 10), num_classes=1000),
        ),
        ModelType(
            "vit_mini",
            TEACHER,
            256,
            "6.7M",
            "small SAM ViT for tests and CPU demos",
            _sam_vit(192, 4, 3, (1, 3), window_size=6),
        ),
        ModelType(
            "vit_t_mini",
            STUDENT,
            256,
            "5.2M",
            "small TinyViT student for tests and CPU demos",
            _tiny_vit((32, 64, 96, 128), (1, 1, 2, 1), (1, 2, 3, 4), num_classes=0),
        ),
    )
}

MODEL_TYPES: tuple[str, ...] = tuple(_REGISTRY)
TEACHER_TYPES: tuple[str, ...] = tuple(n for n, s in _REGISTRY.items() if s.role == TEACHER)
STUDENT_TYPES: tuple[str, ...] = tuple(n for n, s in _REGISTRY.items() if s.role == STUDENT)


def model_type_info(model_type: str) -> ModelType:
    """Registry entry of `model_type`; ValueError listing the valid types if unknown."""
    try:
        return _REGISTRY[model_type]
    except KeyError:
        valid = ", ".join(MODEL_TYPES)
        raise ValueError(f"unknown model type {model_type!r}; choose one of: {valid}") from None


def default_image_size(model_type: str) -> int:
    """Image size the model type was designed (and, for official weights, trained) for."""
    return model_type_info(model_type).default_image_size


def describe_model_types() -> str:
    """One line per model type (name, role, parameters, default image size, summary)."""
    return "\n".join(
        f"{s.name:<10}  {s.role:<7}  {s.num_params:>6} params  {s.default_image_size:>4} px  "
        f"{s.summary}"
        for s in _REGISTRY.values()
    )


def check_image_size(image_size: int) -> None:
    """ValueError unless `image_size` is a positive multiple of 64."""
    if image_size <= 0 or image_size % IMAGE_SIZE_MULTIPLE:
        raise ValueError(
            f"image size must be a positive multiple of {IMAGE_SIZE_MULTIPLE}, got {image_size}"
        )


def build_sam(
    model_type: str,
    *,
    image_size: int | None = None,
    checkpoint: str | PathLike[str] | None = None,
    gradient_checkpointing: bool = False,
    device: torch.device | str | None = None,
) -> Sam:
    """Builds a model type in eval mode, optionally with weights from `checkpoint`.

    `image_size` defaults to the type's own size. Parameters are created directly on `device`
    (CPU by default); `device="meta"` builds the structure without allocating memory.
    """
    info = model_type_info(model_type)
    size = info.default_image_size if image_size is None else image_size
    check_image_size(size)
    target = torch.device("cpu" if device is None else device)
    if checkpoint is not None and target.type == "meta":
        raise ValueError("cannot load a checkpoint into a model on the meta device")

    # With a checkpoint, random initialisation would be overwritten by the strict load.
    with target, SkippedInit() if checkpoint is not None else contextlib.nullcontext():
        sam = _assemble(info.build_encoder(size, gradient_checkpointing), size)
    # Sam creates its pixel statistics on the CPU whatever the default device.
    sam.to(target)
    if checkpoint is not None:
        load_weights(sam, checkpoint, model_type)
    return sam.eval()


def build_prompt_decoder(image_size: int) -> tuple[PromptEncoder, MaskDecoder]:
    """SAM's prompt encoder and mask decoder for `image_size` (the same on every model type)."""
    embedding_size = image_size // PATCH_SIZE
    prompt_encoder = PromptEncoder(
        embed_dim=PROMPT_EMBED_DIM,
        image_embedding_size=(embedding_size, embedding_size),
        input_image_size=(image_size, image_size),
        mask_in_chans=16,
    )
    mask_decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(
            depth=2, embedding_dim=PROMPT_EMBED_DIM, mlp_dim=2048, num_heads=8
        ),
        transformer_dim=PROMPT_EMBED_DIM,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
    )
    return prompt_encoder, mask_decoder


def _assemble(image_encoder: nn.Module, image_size: int) -> Sam:
    prompt_encoder, mask_decoder = build_prompt_decoder(image_size)
    return Sam(
        image_encoder=image_encoder,
        prompt_encoder=prompt_encoder,
        mask_decoder=mask_decoder,
        pixel_mean=list(PIXEL_MEAN),
        pixel_std=list(PIXEL_STD),
    )
