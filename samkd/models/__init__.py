"""SAM teachers and MobileSAM students: building, weights, and taps on intermediate results."""

from samkd.models.attention_capture import AttentionCapture
from samkd.models.checkpoint import (
    CheckpointError,
    SkippedInit,
    check_weights_file,
    load_state_dict_file,
    load_weights,
    save_state_dict,
)
from samkd.models.fast_attention import (
    FastAttentionHandle,
    enable_fast_attention,
    fast_attention,
    fast_teacher_enabled,
    optimize_teacher,
)
from samkd.models.image_encoder import CheckpointedImageEncoderViT
from samkd.models.registry import (
    DECODER_PREFIXES,
    MODEL_TYPES,
    STUDENT_TYPES,
    TEACHER_TYPES,
    ModelType,
    build_prompt_decoder,
    build_sam,
    check_image_size,
    default_image_size,
    describe_model_types,
    model_type_info,
)
from samkd.models.taps import (
    DECODER_MASK_LOGITS,
    DECODER_UPSCALED,
    ENCODER_EMBED,
    TapError,
    Taps,
    available_taps,
    capture_taps,
)
from samkd.models.teacher import PromptDecoder, build_teacher, frozen
from samkd.models.tiny_vit import TinyViT

__all__ = [
    "DECODER_MASK_LOGITS",
    "DECODER_UPSCALED",
    "DECODER_PREFIXES",
    "ENCODER_EMBED",
    "MODEL_TYPES",
    "STUDENT_TYPES",
    "TEACHER_TYPES",
    "AttentionCapture",
    "CheckpointError",
    "SkippedInit",
    "CheckpointedImageEncoderViT",
    "FastAttentionHandle",
    "ModelType",
    "PromptDecoder",
    "TapError",
    "Taps",
    "TinyViT",
    "available_taps",
    "build_prompt_decoder",
    "build_sam",
    "build_teacher",
    "capture_taps",
    "check_image_size",
    "default_image_size",
    "describe_model_types",
    "enable_fast_attention",
    "fast_attention",
    "fast_teacher_enabled",
    "frozen",
    "load_state_dict_file",
    "check_weights_file",
    "load_weights",
    "model_type_info",
    "optimize_teacher",
    "save_state_dict",
]
