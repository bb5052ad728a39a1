"""Teacher features for a training batch: read from the feature file, or computed online.

Precomputed: encoder taps come with the batch (read by the DataLoader workers from the
`FeatureStore`); decoder matching runs the teacher's prompt encoder and mask decoder, stored
in the file, on the stored embedding (a SAM 2 teacher's also on its stored high-resolution
maps). Online: the frozen teacher runs under `inference_mode`. Either way the teacher sees the
student's prompts. A teacher in the `square` frame (SAM 2) sees its own input, decodes the
prompts mapped into its frame, and its maps are mapped into the student's frame
(`samkd.train.frames`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from segment_anything.modeling import MaskDecoder, PromptEncoder, Sam

from samkd.features import read_decoder_state_dict
from samkd.models import AttentionCapture, build_teacher, frozen
from samkd.models.fast_attention import FastTeacherMode, fast_teacher_enabled
from samkd.models.frames import LONGEST_SIDE, Frame
from samkd.models.taps import ENCODER_HIGH_RES
from samkd.models.teacher import prompt_decoder_for
from samkd.settings import TeacherSettings, model_frame
from samkd.train.batches import TrainingBatch
from samkd.train.forward import (
    DECODER_MASK_LOGITS,
    DECODER_UPSCALED,
    ENCODER_EMBED,
    PromptGroup,
    decoder_features,
    encoder_forward,
    high_res_of,
)
from samkd.train.frames import encoder_to_pipeline
from samkd.train.prompt_loop import TeacherDecoder

TeacherFeatures = dict[str, torch.Tensor | AttentionCapture]


@dataclass
class Teacher:
    """One frozen teacher: its decoder, and its whole model when running online; the frame
    it runs in."""

    name: str
    prompt_encoder: PromptEncoder
    mask_decoder: MaskDecoder
    model: Sam | None
    encoder_taps: list[str]
    frame: Frame = LONGEST_SIDE


def load_precomputed_teacher(
    settings: TeacherSettings,
    features: Path,
    image_size: int,
    taps: Sequence[str],
    device: torch.device,
) -> Teacher:
    frame = model_frame(settings.model_type, settings.frame)
    decoder = prompt_decoder_for(settings.model_type, image_size, frame)
    decoder.load_state_dict(read_decoder_state_dict(features, settings.name), strict=True)
    frozen(decoder.to(device))
    return Teacher(
        settings.name, decoder.prompt_encoder, decoder.mask_decoder, None, list(taps), frame
    )


def load_online_teacher(
    settings: TeacherSettings,
    image_size: int,
    taps: Sequence[str],
    device: torch.device,
    *,
    fast: FastTeacherMode = "auto",
    compile: bool = False,
) -> Teacher:
    """The whole frozen teacher; `fast` (`distillation.fast_teachers`) puts its image encoder
    on the fast path (`samkd.models.fast_attention`; auto: on when `device` is CUDA)."""
    frame = model_frame(settings.model_type, settings.frame)
    model = build_teacher(
        settings.model_type,
        image_size,
        settings.checkpoint,
        device,
        fast=fast_teacher_enabled(fast, device),
        compile=compile,
        frame=frame,
    )
    return Teacher(
        settings.name, model.prompt_encoder, model.mask_decoder, model, list(taps), frame
    )


def _outside_inference(value: torch.Tensor | AttentionCapture) -> torch.Tensor | AttentionCapture:
    """A copy usable by autograd: inference tensors cannot be saved for backward."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    changes = {
        field.name: getattr(value, field.name).clone()
        for field in dataclasses.fields(value)
        if isinstance(getattr(value, field.name), torch.Tensor)
    }
    return dataclasses.replace(value, **changes)


def teacher_encoder_features(teacher: Teacher, batch: TrainingBatch) -> TeacherFeatures:
    """Encoder taps `B x ...` (plus the embedding) of one teacher for the batch, in its own
    frame."""
    if teacher.model is None:
        return {
            tap: torch.stack(
                [item.teacher_features[teacher.name][tap] for item in batch.samples]
            ).float()
            for tap in teacher.encoder_taps
        }
    images = batch.teacher_inputs(teacher.frame)
    with torch.inference_mode():
        _, captured = encoder_forward(teacher.model, images, teacher.encoder_taps)
    return {tap: _outside_inference(value) for tap, value in captured.items()}  # type: ignore[arg-type]


def native_features(
    teachers: Sequence[Teacher], batch: TrainingBatch
) -> dict[str, TeacherFeatures]:
    """Every teacher's encoder taps for the batch, each in its own frame."""
    return {teacher.name: teacher_encoder_features(teacher, batch) for teacher in teachers}


def teacher_features(
    teachers: Sequence[Teacher],
    batch: TrainingBatch,
    groups: Sequence[PromptGroup],
    decoder_taps: Sequence[str],
    native: dict[str, TeacherFeatures] | None = None,
) -> dict[str, TeacherFeatures]:
    """`{teacher: {tap: features}}` for every teacher, in the student's frame, decoder taps for
    the student's prompts. `native`: the teachers' encoder taps (`native_features`), when
    already computed."""
    native = native_features(teachers, batch) if native is None else native
    image_size = batch.images.shape[-1]
    sizes = [item.sample.input_size for item in batch.samples]
    result: dict[str, TeacherFeatures] = {}
    for teacher in teachers:
        own = native[teacher.name]
        features: TeacherFeatures = dict(own)
        if teacher.frame != LONGEST_SIDE:
            features = encoder_to_pipeline(own, teacher.encoder_taps, sizes, image_size)  # type: ignore[assignment]
        if decoder_taps and groups:
            with torch.no_grad():
                outputs = decoder_of(teacher, own).decode(
                    groups, record_upscaled=DECODER_UPSCALED in decoder_taps
                )
            features.update(decoder_features(outputs, decoder_taps))
        result[teacher.name] = features
    return result


def decoder_of(teacher: Teacher, native: TeacherFeatures) -> TeacherDecoder:
    """A teacher's decoder on its encoder features of a batch (`native`, its frame)."""
    embedding = native[ENCODER_EMBED]
    assert isinstance(embedding, torch.Tensor)
    return TeacherDecoder(
        teacher.name,
        teacher.prompt_encoder,
        teacher.mask_decoder,
        embedding,
        high_res_of(native),
        teacher.frame,
    )


def teacher_decoders(
    teachers: Sequence[Teacher], native: dict[str, TeacherFeatures]
) -> list[TeacherDecoder]:
    """Each teacher's decoder with its image features from `native` (`native_features`), for
    the prompt loop."""
    return [decoder_of(teacher, native[teacher.name]) for teacher in teachers]


def split_taps(taps: Sequence[str]) -> tuple[list[str], list[str]]:
    """Encoder taps and decoder taps of a tap list."""
    decoder = [tap for tap in taps if tap in (DECODER_UPSCALED, DECODER_MASK_LOGITS)]
    return [tap for tap in taps if tap not in decoder], decoder


def stored_taps(required: Sequence[str], sam2: bool = False) -> list[str]:
    """What the feature file must hold for `required` teacher taps: the encoder taps, and the
    embedding whenever the decoder runs on it (a SAM 2 decoder's high-resolution maps too)."""
    encoder, decoder = split_taps(required)
    if decoder:
        needed = [ENCODER_EMBED, *(ENCODER_HIGH_RES if sam2 else ())]
        encoder += [tap for tap in needed if tap not in encoder]
    return sorted(encoder)
