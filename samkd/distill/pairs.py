"""Default matched taps for each (student, teacher) model pair.

Defaults are computed from each encoder's attention-block count, so the small presets get
sensible pairs too; `distillation.encoder.pairs` and `distillation.attention.pairs` override them,
and a teacher's own `encoder_pairs` / `attention_pairs` override those.

- encoder: `encoder.embed` <-> `encoder.embed` (256 channels on every SAM model, so no adapter;
  MobileSAM's decoupled distillation);
- attention: the student's last attention block <-> the teacher's last global-attention block
  (its last block for SAM ViTs; TinyViT has no global attention, so its last block; SAM 2's
  Hiera: its last global block at stride 16).
"""

from __future__ import annotations

from dataclasses import dataclass

from samkd.models.registry import model_type_info
from samkd.models.taps import ENCODER_EMBED
from samkd.settings import ModelType, TapPair

EMBEDDING_TAP = ENCODER_EMBED


@dataclass(frozen=True)
class EncoderLayout:
    """What the default pairs need to know about an image encoder.

    Attributes:
        attention_blocks: number of attention blocks, tapped as `encoder.qk.<i>`, `i` counted
            globally in order (TinyViT: across stages 1..3).
        global_attention: indices of the blocks with global attention (empty when all are
            windowed).
    """

    attention_blocks: int
    global_attention: tuple[int, ...]


def encoder_layout(model_type: ModelType) -> EncoderLayout:
    """The encoder layout of a registry model.

    `vit_mini` is a 4-block SAM ViT with global attention on blocks 1 and 3. SAM 2's layouts
    are in the registry (its stride-16 global blocks, the only ones tapped).
    """
    info = model_type_info(model_type)
    if info.sam2 is not None:
        return EncoderLayout(info.blocks, info.global_attention)
    if model_type == "vit_b":
        return EncoderLayout(12, (2, 5, 8, 11))
    if model_type == "vit_l":
        return EncoderLayout(24, (5, 11, 17, 23))
    if model_type == "vit_h":
        return EncoderLayout(32, (7, 15, 23, 31))
    if model_type == "vit_mini":
        return EncoderLayout(4, (1, 3))
    if model_type == "vit_t":
        return EncoderLayout(10, ())  # TinyViT depths [2, 2, 6, 2]: stages 1..3 attend
    if model_type == "vit_t_mini":
        return EncoderLayout(4, ())  # TinyViT depths [1, 1, 2, 1]
    raise ValueError(f"unknown model type '{model_type}'")


def last_attention_block(layout: EncoderLayout) -> int:
    """The last global-attention block, or the last block when none is global."""
    if layout.global_attention:
        return layout.global_attention[-1]
    return layout.attention_blocks - 1


def default_encoder_pairs(student: ModelType, teacher: ModelType) -> list[TapPair]:
    """`encoder.embed` <-> `encoder.embed` for every model pair."""
    return [TapPair(student=EMBEDDING_TAP, teacher=EMBEDDING_TAP)]


def default_attention_pairs(student: ModelType, teacher: ModelType) -> list[TapPair]:
    """The student's last attention block <-> the teacher's last global-attention block."""
    student_block = last_attention_block(encoder_layout(student))
    teacher_block = last_attention_block(encoder_layout(teacher))
    return [TapPair(student=f"encoder.qk.{student_block}", teacher=f"encoder.qk.{teacher_block}")]
