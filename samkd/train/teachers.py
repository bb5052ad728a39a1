"""Teacher features for a training batch: read from the feature file, or computed online.

Precomputed: encoder taps come with the batch (read by the DataLoader workers from the
`FeatureStore`); decoder matching runs the teacher's prompt encoder and mask decoder, stored
in the file, on the stored embedding. Online: the frozen teacher runs under `inference_mode`.
Either way the teacher sees the student's prompts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from segment_anything.modeling import MaskDecoder, PromptEncoder, Sam

from samkd.features import read_decoder_state_dict
from samkd.models import AttentionCapture, PromptDecoder, build_teacher, frozen
from samkd.models.fast_attention import FastTeacherMode, fast_teacher_enabled
from samkd.settings import TeacherSettings
from samkd.train.batches import TrainingBatch
from samkd.train.forward import (
    DECODER_MASK_LOGITS,
    DECODER_UPSCALED,
    ENCODER_EMBED,
    PromptGroup,
    decoder_features,
    encoder_forward,
    run_decoder,
)
from samkd.train.prompt_loop import TeacherDecoder

TeacherFeatures = dict[str, torch.Tensor | AttentionCapture]


@dataclass
class Teacher:
    """One frozen teacher: its decoder, and its whole model when running online."""

    name: str
    prompt_encoder: PromptEncoder
    mask_decoder: MaskDecoder
    model: Sam | None
    encoder_taps: list[str]


def load_precomputed_teacher(
    settings: TeacherSettings,
    features: Path,
    image_size: int,
    taps: Sequence[str],
    device: torch.device,
) -> Teacher:
    decoder = PromptDecoder(image_size)
    decoder.load_state_dict(read_decoder_state_dict(features, settings.name), strict=True)
    frozen(decoder.to(device))
    return Teacher(settings.name, decoder.prompt_encoder, decoder.mask_decoder, None, list(taps))


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
    model = build_teacher(
        settings.model_type,
        image_size,
        settings.checkpoint,
        device,
        fast=fast_teacher_enabled(fast, device),
        compile=compile,
    )
    return Teacher(settings.name, model.prompt_encoder, model.mask_decoder, model, list(taps))


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
    """Encoder taps `B x ...` (plus the embedding) of one teacher for the batch."""
    if teacher.model is None:
        return {
            tap: torch.stack(
                [item.teacher_features[teacher.name][tap] for item in batch.samples]
            ).float()
            for tap in teacher.encoder_taps
        }
    with torch.inference_mode():
        _, captured = encoder_forward(teacher.model, batch.teacher_inputs(), teacher.encoder_taps)
    return {tap: _outside_inference(value) for tap, value in captured.items()}  # type: ignore[arg-type]


def teacher_features(
    teachers: Sequence[Teacher],
    batch: TrainingBatch,
    groups: Sequence[PromptGroup],
    decoder_taps: Sequence[str],
) -> dict[str, TeacherFeatures]:
    """`{teacher: {tap: features}}` for every teacher, decoder taps for the student's prompts."""
    result: dict[str, TeacherFeatures] = {}
    for teacher in teachers:
        features = teacher_encoder_features(teacher, batch)
        if decoder_taps and groups:
            embedding = features[ENCODER_EMBED]
            assert isinstance(embedding, torch.Tensor)
            with torch.no_grad():
                outputs = run_decoder(
                    teacher.prompt_encoder,
                    teacher.mask_decoder,
                    embedding,
                    groups,
                    record_upscaled=DECODER_UPSCALED in decoder_taps,
                )
            features.update(decoder_features(outputs, decoder_taps))
        result[teacher.name] = features
    return result


def teacher_decoders(
    teachers: Sequence[Teacher], features: dict[str, TeacherFeatures]
) -> list[TeacherDecoder]:
    """Each teacher's decoder with its image embeddings from `features` (`teacher_features`),
    for the prompt loop."""
    decoders = []
    for teacher in teachers:
        embedding = features[teacher.name][ENCODER_EMBED]
        assert isinstance(embedding, torch.Tensor)
        decoders.append(
            TeacherDecoder(teacher.name, teacher.prompt_encoder, teacher.mask_decoder, embedding)
        )
    return decoders


def split_taps(taps: Sequence[str]) -> tuple[list[str], list[str]]:
    """Encoder taps and decoder taps of a tap list."""
    decoder = [tap for tap in taps if tap in (DECODER_UPSCALED, DECODER_MASK_LOGITS)]
    return [tap for tap in taps if tap not in decoder], decoder


def stored_taps(required: Sequence[str]) -> list[str]:
    """What the feature file must hold for `required` teacher taps: the encoder taps, and the
    embedding whenever the decoder runs on it."""
    encoder, decoder = split_taps(required)
    if decoder and ENCODER_EMBED not in encoder:
        encoder.append(ENCODER_EMBED)
    return sorted(encoder)
