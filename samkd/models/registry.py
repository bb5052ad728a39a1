"""Builders for the SAM teachers and MobileSAM students, by model type.

Two families (`ModelType.family`), each with SAM's prompt embedding dim 256, so image
embeddings are `B x 256 x S/16 x S/16` for image size `S` on every model type:

- `sam`: a `segment_anything.modeling.Sam` (SAM 1's ViTs, MobileSAM's TinyViT), with SAM's
  prompt encoder and mask decoder, in the `longest_side` frame;
- `sam2`: a `samkd.models.sam2_model.Sam2Model`, sam2's `SAM2Base` built from the `sam2`
  package's Hydra configs (an optional dependency), presenting the same three parts; its mask
  decoder also takes two high-resolution maps; SAM 2 runs in the `square` frame
  (`samkd.models.frames`).

| type       | role    | params | image size | image encoder                                    |
|------------|---------|--------|------------|--------------------------------------------------|
| vit_b      | teacher | 93.7M  | 1024       | SAM ViT-B: 768 wide, 12 blocks                   |
| vit_l      | teacher | 312.3M | 1024       | SAM ViT-L: 1024 wide, 24 blocks                  |
| vit_h      | teacher | 641.1M | 1024       | SAM ViT-H: 1280 wide, 32 blocks                  |
| vit_t      | student | 10.1M  | 1024       | MobileSAM TinyViT-5M                             |
| vit_mini   | teacher | 6.7M   | 256        | SAM ViT, 192 wide, 4 blocks (tests, CPU demos)   |
| vit_t_mini | student | 5.2M   | 256        | TinyViT, 32-128 wide, 5 blocks (tests, demos)    |
| sam2.1_hiera_t / _s / _b+ / _l | teacher | 39.0M / 46.1M / 80.9M / 224.4M | 1024 | SAM 2.1 Hiera |
| sam2_hiera_t / _s / _b+ / _l   | teacher | 38.9M / 46.0M / 80.8M / 224.4M | 1024 | SAM 2 Hiera   |
| hiera_mini | teacher | 7.7M   | 256        | SAM 2.1 Hiera, 32-256 wide, 5 blocks (tests, demos) |

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
from samkd.models.frames import LONGEST_SIDE, SQUARE, Frame
from samkd.models.image_encoder import CheckpointedImageEncoderViT
from samkd.models.sam2_build import Sam2Config
from samkd.models.tiny_vit import TinyViT

PATCH_SIZE = 16
PROMPT_EMBED_DIM = 256
# State-dict prefixes of the prompt encoder and mask decoder (the same on every `sam` type).
DECODER_PREFIXES = ("prompt_encoder.", "mask_decoder.")
# ... and on every `sam2` type (`SAM2Base`'s names).
SAM2_DECODER_PREFIXES = ("sam_prompt_encoder.", "sam_mask_decoder.")
# State-dict prefixes of the SAM 2 parts that single-image segmentation never runs (memory
# attention and encoder, object pointers): built, since checkpoints hold them, never trained.
SAM2_UNUSED_PREFIXES = (
    "memory_attention.",
    "memory_encoder.",
    "mask_downsample.",
    "obj_ptr_proj.",
    "obj_ptr_tpos_proj.",
    "maskmem_tpos_enc",
    "no_mem_pos_enc",
    "no_obj_ptr",
    "no_obj_embed_spatial",
)
# Image sizes must be multiples of this so every model's token grids are whole.
IMAGE_SIZE_MULTIPLE = 64
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)

TEACHER = "teacher"
STUDENT = "student"
SAM = "sam"
SAM2 = "sam2"

EncoderBuilder = Callable[[int, bool], nn.Module]


@dataclass(frozen=True)
class ModelType:
    """One entry of the registry: a `sam` type's `build_encoder(image_size,
    gradient_checkpointing)`, or a `sam2` type's config (`sam2`).

    `global_attention`: the blocks whose attention is global (SAM 2: those at stride 16, the
    only ones `encoder.qk.<i>` taps); `blocks`: the image encoder's number of blocks."""

    name: str
    role: str
    default_image_size: int
    num_params: str
    summary: str
    build_encoder: EncoderBuilder | None = None
    sam2: Sam2Config | None = None
    blocks: int = 0
    global_attention: tuple[int, ...] = ()

    @property
    def family(self) -> str:
        return SAM if self.sam2 is None else SAM2

    @property
    def frame(self) -> Frame:
        """The frame the model was trained in (`samkd.models.frames`)."""
        return LONGEST_SIDE if self.sam2 is None else SQUARE


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


def _sam2_types(version: str, folder: str) -> tuple[ModelType, ...]:
    """The four Hiera sizes of SAM 2 (`version` "2") or SAM 2.1 ("2.1")."""
    prefix = f"sam{version}_hiera"
    sizes = (
        ("t", "39.0M" if version == "2.1" else "38.9M", "Hiera-T", 12, (5, 7, 9)),
        ("s", "46.1M" if version == "2.1" else "46.0M", "Hiera-S", 16, (7, 10, 13)),
        ("b+", "80.9M" if version == "2.1" else "80.8M", "Hiera-B+", 24, (12, 16, 20)),
        ("l", "224.4M", "Hiera-L", 48, (23, 33, 43)),
    )
    return tuple(
        ModelType(
            f"{prefix}_{size}",
            TEACHER,
            1024,
            params,
            f"SAM {version} {name}",
            sam2=Sam2Config(f"configs/{folder}/{prefix}_{size}.yaml"),
            blocks=blocks,
            global_attention=global_blocks,
        )
        for size, params, name, blocks, global_blocks in sizes
    )


# SAM 2.1 Hiera-T's classes, narrow and shallow: tests and CPU demos at 256 px.
HIERA_MINI = Sam2Config(
    "configs/sam2.1/sam2.1_hiera_t.yaml",
    (
        "++model.image_encoder.trunk.embed_dim=32",
        "++model.image_encoder.trunk.num_heads=1",
        "++model.image_encoder.trunk.stages=[1,1,2,1]",
        "++model.image_encoder.trunk.global_att_blocks=[3]",
        "++model.image_encoder.trunk.window_spec=[8,4,8,4]",
        "++model.image_encoder.neck.backbone_channel_list=[256,128,64,32]",
        "++model.memory_attention.num_layers=1",
        "++model.memory_attention.layer.dim_feedforward=256",
    ),
)

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
        *_sam2_types("2.1", "sam2.1"),
        *_sam2_types("2", "sam2"),
        ModelType(
            "hiera_mini",
            TEACHER,
            256,
            "7.7M",
            "small SAM 2.1 Hiera for tests and CPU demos",
            sam2=HIERA_MINI,
            blocks=5,
            global_attention=(3,),
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


def is_sam2_type(model_type: str) -> bool:
    """Whether `model_type` is of the SAM 2 family."""
    return model_type_info(model_type).family == SAM2


def describe_model_types() -> str:
    """One line per model type (name, role, parameters, default image size, summary)."""
    return "\n".join(
        f"{s.name:<15}  {s.role:<7}  {s.num_params:>6} params  {s.default_image_size:>4} px  "
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
    if info.sam2 is not None:
        if gradient_checkpointing:
            raise ValueError(f"{model_type}: gradient checkpointing is not built for SAM 2")
        from samkd.models.sam2_build import build_sam2_model

        model: Sam = build_sam2_model(model_type, info.sam2, size, checkpoint, target)
        return model
    assert info.build_encoder is not None

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
