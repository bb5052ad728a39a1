"""`samkd extract`: run the teachers over a dataset and store their features in HDF5."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from segment_anything.modeling import Sam
from torch.utils.data import DataLoader, Subset

from samkd.data import (
    SAM_PIXEL_MEAN,
    SAM_PIXEL_STD,
    SegmentationDataset,
    build_dataset,
    collate_samples,
)
from samkd.distill import coarse_attention_map
from samkd.errors import UsageError
from samkd.features import (
    ExtractionPlan,
    FeatureWriter,
    describe_image_file,
    format_bytes,
    join_shards,
    open_for_extraction,
    plan_from_settings,
    planned_bytes,
    teacher_taps,
)
from samkd.models import (
    ENCODER_EMBED,
    AttentionCapture,
    available_taps,
    build_prompt_decoder,
    build_sam,
    build_teacher,
    capture_taps,
)
from samkd.models.fast_attention import fast_teacher_enabled
from samkd.runtime import (
    Distributed,
    barrier,
    device_for,
    init_distributed,
    input_image_size,
    progress_bar,
    resolve_device,
    resolve_precision,
    shutdown,
)
from samkd.settings import Settings, TeacherSettings

EMBED_TAP = ENCODER_EMBED


def preprocessing_of(image_size: int) -> dict[str, Any]:
    """Everything that decides a teacher's input pixels, recorded in the file."""
    return {
        "image_size": image_size,
        "resize": "longest_side",
        "pad": "bottom_right",
        "pixel_mean": list(SAM_PIXEL_MEAN),
        "pixel_std": list(SAM_PIXEL_STD),
    }


def check_taps(model: Sam, taps: list[str]) -> None:
    """Only encoder taps can be stored: decoder outputs depend on the prompts."""
    for tap in taps:
        if tap.startswith("decoder."):
            raise UsageError(
                f"extract.taps: '{tap}' depends on prompts and cannot be stored; training runs "
                "the stored teacher decoder on the stored encoder.embed instead"
            )
    valid = set(available_taps(model)) | {EMBED_TAP}
    unknown = [tap for tap in taps if tap not in valid]
    if unknown:
        encoder_taps = sorted(t for t in valid if t.startswith("encoder."))
        raise UsageError(
            f"extract.taps: unknown tap '{unknown[0]}'; valid taps: {', '.join(encoder_taps)}"
        )


@torch.inference_mode()
def teacher_tap_outputs(
    model: Sam, images: torch.Tensor, taps: list[str], grid_size: int
) -> dict[str, torch.Tensor]:
    """`{tap: B x ...}` on the model's device; attention taps as coarse `B x G² x G²` maps."""
    other_taps = [tap for tap in taps if tap != EMBED_TAP]
    with capture_taps(model, other_taps) as captured:
        embedding = model.image_encoder(images)
        values: dict[str, Any] = dict(captured)
    values[EMBED_TAP] = embedding
    outputs = {}
    for tap in taps:
        value = values[tap]
        if isinstance(value, AttentionCapture):
            value = coarse_attention_map(value, grid_size=grid_size)
        outputs[tap] = value
    return outputs


def teacher_batch_features(
    model: Sam, images: torch.Tensor, taps: list[str], grid_size: int
) -> dict[str, torch.Tensor]:
    """`{tap: B x ...}` float32 on the CPU, ready for the writer."""
    outputs = teacher_tap_outputs(model, images, taps, grid_size)
    return {tap: value.float().cpu() for tap, value in outputs.items()}


def probe_tap_shapes(
    model_type: str, taps: list[str], image_size: int, grid_size: int
) -> dict[str, tuple[int, ...]]:
    """Per-image shape of each tap, from a forward on the meta device: no weights are
    initialised and nothing is computed, so planning a ViT-H costs milliseconds."""
    model = build_sam(model_type, image_size=image_size, device="meta")
    check_taps(model, taps)
    image = torch.zeros(1, 3, image_size, image_size, device="meta")
    outputs = teacher_tap_outputs(model, image, taps, grid_size)
    return {tap: tuple(value.shape[1:]) for tap, value in outputs.items()}


def decoder_bytes(image_size: int) -> int:
    """Bytes of one teacher's prompt encoder and mask decoder as stored (float32)."""
    parts = build_prompt_decoder(image_size)
    return sum(p.numel() * p.element_size() for part in parts for p in part.parameters())


def load_extraction_dataset(settings: Settings, image_size: int) -> SegmentationDataset:
    if settings.data.train is None:
        raise UsageError("no dataset to extract: pass --data FOLDER or set data.train")
    return build_dataset(
        settings.data.train,
        layout=settings.data.layout,
        annotation_file=settings.data.annotation_file,
        image_size=image_size,
        on_error=settings.data.on_error,
        max_objects=0,  # features need the pixels only
    )


def make_plan(
    settings: Settings, dataset: SegmentationDataset, image_size: int, device: torch.device
) -> ExtractionPlan:
    images = [describe_image_file(record.image_path, record.image_id) for record in dataset.records]
    tap_shapes = {
        entry.name: probe_tap_shapes(
            entry.model_type,
            teacher_taps(settings, entry),
            image_size,
            settings.extract.attention_grid,
        )
        for entry in settings.teachers
    }
    return plan_from_settings(
        settings,
        images,
        tap_shapes,
        preprocessing_of(image_size),
        image_size=image_size,
        compute=compute_of(settings, device),
    )


def compute_of(settings: Settings, device: torch.device) -> dict[str, str]:
    """How the teachers run on `device`, recorded in the file: a resumed extraction must not
    mix, say, bf16 fast-path features with float32 reference ones."""
    fast = fast_teacher_enabled(settings.extract.fast_teacher, device)
    return {
        "precision": resolve_precision(settings.extract.precision, device).name,
        "attention": "fused" if fast else "reference",
    }


def extract_teacher(
    writer: FeatureWriter,
    entry: TeacherSettings,
    dataset: SegmentationDataset,
    settings: Settings,
    image_size: int,
    device: torch.device,
    console: Console,
) -> None:
    """Compute and queue one teacher's features for the images this rank still lacks."""
    todo = writer.todo(entry.name)
    if not todo:
        return
    fast = fast_teacher_enabled(settings.extract.fast_teacher, device)
    precision = resolve_precision(settings.extract.precision, device)
    model = build_teacher(
        entry.model_type,
        image_size,
        entry.checkpoint,
        device,
        fast=fast,
        compile=settings.extract.compile,
    )
    writer.write_decoder_state(entry.name, model.state_dict())
    loader = DataLoader(
        Subset(dataset, todo),
        batch_size=settings.extract.batch_size,
        num_workers=settings.data.num_workers,
        collate_fn=collate_samples,
        pin_memory=device.type == "cuda",
    )
    with progress_bar(console=console) as bar:
        task = bar.add_task(f"teacher {entry.name}", total=len(todo))
        for batch in loader:
            images = batch.images.to(device, non_blocking=True)
            with precision.autocast(device):
                features = teacher_batch_features(
                    model, images, teacher_taps(settings, entry), settings.extract.attention_grid
                )
            writer.write_batch(entry.name, batch.indices, features)
            bar.advance(task, len(batch.indices))


def run_extract(settings: Settings, console: Console | None = None) -> Path | None:
    """Extract every teacher's features into `extract.output`; resumes an interrupted run."""
    console = console or Console(stderr=True)
    dist = init_distributed(settings.extract.device)
    try:
        return _extract(settings, dist, console)
    finally:
        shutdown(dist)


def _extract(settings: Settings, dist: Distributed, console: Console) -> Path | None:
    if not settings.teachers:
        raise UsageError("no teacher to extract: pass --teacher MODEL_TYPE or set teachers")
    device = device_for(dist, resolve_device(settings.extract.device))
    image_size = input_image_size(settings)
    dataset = load_extraction_dataset(settings, image_size)
    plan = make_plan(settings, dataset, image_size, device)
    output = settings.extract.output
    decoders = len(settings.teachers) * decoder_bytes(image_size)
    console.print(
        f"extracting {len(settings.teachers)} teacher(s) x {plan.num_images} images at "
        f"{image_size} px into {output} (planned {format_bytes(planned_bytes(plan))} of "
        f"features + {format_bytes(decoders)} of teacher decoders)"
    )
    writer = open_for_extraction(
        output, plan, rank=dist.rank, world_size=dist.world_size, layout=settings.extract.join
    )
    console.print(writer.message)
    with writer:
        for entry in settings.teachers:
            extract_teacher(writer, entry, dataset, settings, image_size, device, console)
        result = writer.finish(join=not dist.enabled)
    if dist.enabled:
        barrier(dist)
        if dist.is_main and not output.exists():
            result = join_shards(output, layout=settings.extract.join)
        barrier(dist)
    if result is not None:
        console.print(f"wrote {result} ({format_bytes(result.stat().st_size)} on disk)")
    return result
