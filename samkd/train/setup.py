"""Everything a training run needs, built from the settings before the loop starts."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from loguru import logger
from segment_anything.modeling import Sam
from torch import nn
from torch.utils.data import DataLoader

from samkd import __version__
from samkd.data import PromptSampler, SegmentationDataset, build_dataset
from samkd.distill import DistillationObjective, term_weights
from samkd.distill.adapters import feature_shapes
from samkd.errors import UsageError
from samkd.features import (
    FeatureStore,
    FeatureStoreError,
    file_sha256,
    read_decoder_state_dict,
)
from samkd.models import DECODER_PREFIXES, build_sam, load_state_dict_file
from samkd.models.lora import add_lora
from samkd.runtime import Distributed, Precision, input_image_size
from samkd.settings import Settings, check_micro_batch, load_settings
from samkd.train.batches import Augmentation, DistillationDataset, collate_training
from samkd.train.forward import ENCODER_EMBED, encoder_forward
from samkd.train.optim import encoder_layer_lr_scales, part_lr_scales
from samkd.train.task_loss import TaskLossWeights
from samkd.train.teachers import (
    Teacher,
    load_online_teacher,
    load_precomputed_teacher,
    split_taps,
    stored_taps,
)
from samkd.train.terms import TermSchema
from samkd.train.validation import Validation

SETTINGS_FILE = "settings.yaml"
METRICS_FILE = "metrics.jsonl"
# Parameters that never run in training: TinyViT's ImageNet classifier (kept for strict loading
# of mobile_sam.pt) and the mask-prompt encoder (only the prompt loop gives mask prompts).
# Frozen rather than left without gradients, which DDP rejects.
UNUSED_PREFIXES = (
    "image_encoder.head.",
    "image_encoder.norm_head.",
    "prompt_encoder.mask_downscaling.",
)
MASK_PROMPT_PREFIX = "prompt_encoder.mask_downscaling."


def build_student(settings: Settings, device: torch.device) -> Sam:
    """The student, trainable, with unused and always-frozen parts excluded from training;
    with `student.lora`, only its adapters (and `train_parts`) train."""
    student = build_sam(
        settings.student.model_type,
        image_size=input_image_size(settings),
        checkpoint=settings.student.checkpoint,
        gradient_checkpointing=settings.student.gradient_checkpointing,
    ).to(device)
    if settings.student.decoder_from is not None:
        inherited = teacher_decoder_state(settings, settings.student.decoder_from)
        student.load_state_dict({**student.state_dict(), **inherited}, strict=True)
    if settings.student.lora.rank:
        add_lora(student, settings.student.lora)
    unused: tuple[str, ...] = UNUSED_PREFIXES
    if settings.train.prompt_iters > 1:
        unused = tuple(prefix for prefix in unused if prefix != MASK_PROMPT_PREFIX)
    for name, parameter in student.named_parameters():
        if name.startswith(unused):
            parameter.requires_grad_(False)
    for part, first_step in settings.train.frozen_until.items():
        if first_step == -1:
            getattr(student, part).requires_grad_(False)
    return student


def lr_scales(settings: Settings, student: Sam) -> dict[nn.Parameter, float]:
    """Each student parameter's learning rate as a multiple of `train.lr`: its part's
    `train.lr_scale`, times `train.layer_decay`'s factor in the image encoder."""
    scales = part_lr_scales(student, settings.train.lr_scale.model_dump())
    layers = encoder_layer_lr_scales(student.image_encoder, settings.train.layer_decay)
    for parameter, factor in layers.items():
        scales[parameter] *= factor
    return scales


def teacher_decoder_state(settings: Settings, name: str) -> dict[str, torch.Tensor]:
    """A teacher's prompt-encoder and mask-decoder weights: from the feature file when
    training from one, else from the teacher's checkpoint."""
    features = settings.distillation.features
    if settings.distillation.use_precomputed_features and features is not None:
        return read_decoder_state_dict(features, name)
    teacher = next(entry for entry in settings.teachers if entry.name == name)
    if teacher.checkpoint is None:
        raise UsageError(
            f"student.decoder_from: teacher '{name}' has no checkpoint to take a decoder from"
        )
    weights = load_state_dict_file(teacher.checkpoint)
    return {key: value for key, value in weights.items() if key.startswith(DECODER_PREFIXES)}


def freeze_bn_statistics(settings: Settings) -> bool:
    if settings.student.freeze_bn_stats is None:
        return settings.student.checkpoint is not None
    return settings.student.freeze_bn_stats


def set_train_mode(student: nn.Module, frozen_bn: bool) -> None:
    """Train mode, with BatchNorm statistics kept fixed when asked (small per-GPU batches)."""
    student.train()
    if frozen_bn:
        for module in student.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


def build_train_dataset(settings: Settings) -> SegmentationDataset:
    if settings.data.train is None:
        raise UsageError("no training data: set data.train (a dataset folder)")
    prompts = settings.data.prompts
    sampler = PromptSampler(
        mode=prompts.mode,
        box_jitter=prompts.box_jitter,
        min_positive=prompts.min_points,
        max_positive=prompts.max_points,
        num_negative=prompts.num_negative_points,
    )
    return build_dataset(
        settings.data.train,
        layout=settings.data.layout,
        annotation_file=settings.data.annotation_file,
        image_size=input_image_size(settings),
        on_error=settings.data.on_error,
        mask_threshold=settings.data.mask_threshold,
        prompts=sampler,
        max_objects=prompts.max_objects,
        seed=settings.train.seed,
    )


def build_validation(
    settings: Settings,
    teachers: list[Teacher],
    device: torch.device,
    precision: Precision,
    dist: Distributed,
) -> Validation | None:
    """The validation set (box prompts, no jitter) and, with online teachers or
    `distillation.val_features`, its teacher features."""
    if settings.data.val is None:
        return None
    images = build_dataset(
        settings.data.val,
        layout=settings.data.layout,
        annotation_file=settings.data.annotation_file,
        image_size=input_image_size(settings),
        on_error=settings.data.on_error,
        mask_threshold=settings.data.mask_threshold,
        prompts=PromptSampler(mode="box", box_jitter=0.0),
        seed=settings.train.seed,
    )
    with_teachers = None
    distillation = settings.distillation
    if teachers and not distillation.use_precomputed_features:
        with_teachers = DistillationDataset(images, None, Augmentation(), settings.train.seed)
    elif teachers and distillation.val_features is not None:
        required = {teacher.name: teacher.encoder_taps for teacher in teachers}
        store = FeatureStore(
            distillation.val_features,
            teachers=list(required),
            taps=required,
            dtype=None,
            on_error=settings.data.on_error,
        )
        store.check_matches(
            image_ids=[record.image_id for record in images.records],
            image_files=[record.image_path for record in images.records],
            image_size=input_image_size(settings),
        )
        with_teachers = DistillationDataset(images, store, Augmentation(), settings.train.seed)
    micro_batch = settings.train.batch_size // dist.world_size // settings.train.grad_accumulation
    return Validation(images, with_teachers, teachers, device, precision, micro_batch)


def open_feature_store(
    settings: Settings, dataset: SegmentationDataset, taps: dict[str, list[str]]
) -> FeatureStore:
    """The feature file, checked against the dataset, image size, teachers and taps."""
    path = settings.distillation.features
    if path is None:
        raise UsageError(
            "precomputed distillation needs a feature file: pass --features FILE.h5 "
            "(from `samkd extract`) or --online"
        )
    if not path.is_file():
        raise UsageError(f"{path}: feature file does not exist")
    names = [teacher.name for teacher in settings.teachers]
    # As stored (float16 by default): half the bytes through the workers and to the device,
    # widened there (`teacher_encoder_features`).
    store = FeatureStore(
        path, teachers=names, taps=taps, dtype=None, on_error=settings.data.on_error
    )
    try:
        store.check_matches(
            image_ids=[record.image_id for record in dataset.records],
            image_files=[record.image_path for record in dataset.records],
            image_size=input_image_size(settings),
            teachers=names,
        )
        check_teacher_identity(store, settings)
    except FeatureStoreError as error:
        raise FeatureStoreError(
            f"{error}; rebuild the features for these settings with `samkd extract` (the same "
            "--config and --set, and a new --output), or train with --online"
        ) from None
    leave_out_skipped(dataset, store)
    return store


def leave_out_skipped(dataset: SegmentationDataset, store: FeatureStore) -> None:
    """Drop the images that extraction skipped (their rows hold no features) from `dataset`."""
    skipped = store.skipped_images
    if not skipped:
        return
    dataset.records = [r for i, r in enumerate(dataset.records) if i not in skipped]
    first = min(skipped)
    logger.warning(
        f"{store.path.name}: {len(skipped)} image(s) skipped at extraction and are left "
        f"out; first: '{store.image_ids[first]}' ({skipped[first]})"
    )


def check_teacher_identity(store: FeatureStore, settings: Settings) -> None:
    """Raise a `FeatureStoreError` when a teacher's stored model type or weights are not the
    settings' (weights: by sha256, only where the settings name a checkpoint; the stored
    features and decoders need none)."""
    stored = {teacher.name: teacher for teacher in store.teachers}
    for entry in settings.teachers:
        teacher = stored[entry.name]
        prefix = f"{store.path.name}: teacher '{entry.name}' was extracted"
        if teacher.model_type != entry.model_type:
            raise FeatureStoreError(
                f"{prefix} as {teacher.model_type}, the settings say {entry.model_type}"
            )
        if entry.checkpoint is None:
            continue
        sha256 = file_sha256(entry.checkpoint)
        if sha256 != teacher.checkpoint_sha256:
            weights = (
                "random weights"
                if teacher.checkpoint_sha256 is None
                else f"{teacher.checkpoint_name} (sha256 {teacher.checkpoint_sha256[:12]}...)"
            )
            raise FeatureStoreError(
                f"{prefix} with {weights}, the settings name {entry.checkpoint} "
                f"(sha256 {sha256[:12]}...)"
            )


def build_teachers(
    settings: Settings, required: dict[str, list[str]], device: torch.device
) -> list[Teacher]:
    """Frozen teachers: decoders from the feature file, or whole models when online."""
    teachers = []
    for entry in settings.teachers:
        encoder_taps = stored_taps(required[entry.name])
        if settings.distillation.use_precomputed_features:
            assert settings.distillation.features is not None
            teacher = load_precomputed_teacher(
                entry,
                settings.distillation.features,
                input_image_size(settings),
                encoder_taps,
                device,
            )
        else:
            teacher = load_online_teacher(
                entry,
                input_image_size(settings),
                encoder_taps,
                device,
                fast=settings.distillation.fast_teachers,
            )
        teachers.append(teacher)
    return teachers


def probe_student_shapes(
    student: Sam, taps: list[str], image_size: int, device: torch.device
) -> dict[str, tuple[int, ...]]:
    """`C x H x W` of the student's encoder taps, from one forward on a blank image."""
    encoder_taps, _ = split_taps(taps)
    with torch.no_grad():
        image = torch.zeros(1, 3, image_size, image_size, device=device)
        _, features = encoder_forward(student, image, encoder_taps or [ENCODER_EMBED])
    return feature_shapes({k: v for k, v in features.items() if isinstance(v, torch.Tensor)})


def probe_teacher_shapes(
    store: FeatureStore | None, teachers: list[Teacher], image_size: int, device: torch.device
) -> dict[str, dict[str, tuple[int, ...]]]:
    shapes: dict[str, dict[str, tuple[int, ...]]] = {}
    for teacher in teachers:
        if store is not None:
            (stored,) = [spec for spec in store.teachers if spec.name == teacher.name]
            shapes[teacher.name] = {tap.name: tuple(tap.shape) for tap in stored.taps}
            continue
        assert teacher.model is not None
        with torch.no_grad():
            image = torch.zeros(1, 3, image_size, image_size, device=device)
            _, features = encoder_forward(teacher.model, image, teacher.encoder_taps)
        tensors = {k: v for k, v in features.items() if isinstance(v, torch.Tensor)}
        shapes[teacher.name] = feature_shapes(tensors)
    return shapes


def build_objective(
    settings: Settings,
    student_shapes: dict[str, tuple[int, ...]] | None = None,
    teacher_shapes: dict[str, dict[str, tuple[int, ...]]] | None = None,
) -> DistillationObjective | None:
    """The distillation objective, or None without distillation (no teacher, `lambda_kd` 0 or
    every term switched off).

    Without shapes, every adapter is an identity: enough to ask which taps are needed.
    """
    if not settings.teachers or not term_weights(settings.distillation):
        return None
    return DistillationObjective(
        settings.distillation,
        settings.teachers,
        settings.student.model_type,
        student_shapes=student_shapes,
        teacher_shapes=teacher_shapes,
    )


def build_distillation(
    settings: Settings, student: Sam, dataset: SegmentationDataset, device: torch.device
) -> tuple[DistillationObjective | None, FeatureStore | None, list[Teacher]]:
    """The objective with adapters sized for the student and teachers, the feature file
    (precomputed features) and the teachers; (None, None, []) without distillation."""
    provisional = build_objective(settings)
    if provisional is None:
        return None, None, []
    required = {t.name: provisional.required_teacher_taps(t.name) for t in settings.teachers}
    store = None
    if settings.distillation.use_precomputed_features:
        stored = {name: stored_taps(taps) for name, taps in required.items()}
        store = open_feature_store(settings, dataset, stored)
    teachers = build_teachers(settings, required, device)
    image_size = input_image_size(settings)
    student_taps = provisional.required_student_taps()
    student_shapes = probe_student_shapes(student, student_taps, image_size, device)
    teacher_shapes = probe_teacher_shapes(store, teachers, image_size, device)
    objective = build_objective(settings, student_shapes, teacher_shapes)
    assert objective is not None
    return objective.to(device), store, teachers


def build_schema(settings: Settings, objective: DistillationObjective | None) -> TermSchema:
    """Every term the run logs, the same on every rank and at every step."""
    distillation = {} if objective is None else objective.term_specs()
    train = settings.train
    return TermSchema.build(
        train.task_loss, distillation, train.prompt_iters, task_loss_weights(settings)
    )


def task_loss_weights(settings: Settings) -> TaskLossWeights:
    weights = settings.train.task_loss_weights
    return TaskLossWeights(
        focal=weights.focal,
        dice=weights.dice,
        iou_mse=weights.iou,
        other_outputs=weights.other_outputs,
    )


def write_run_files(settings: Settings, run_dir: Path) -> None:
    """The resolved settings, versions and command line, beside the run's outputs; the log
    of an earlier run in `run_dir` that failed before its first checkpoint is removed."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / METRICS_FILE).unlink(missing_ok=True)
    (run_dir / SETTINGS_FILE).write_text(settings.to_yaml())
    info = {
        "samkd_version": __version__,
        "torch_version": torch.__version__,
        "command": sys.argv,
    }
    (run_dir / "run.json").write_text(json.dumps(info, indent=2) + "\n")


def settings_for_resume(run_dir: Path) -> Settings:
    """The settings a run was started with, read back from its folder."""
    path = run_dir / SETTINGS_FILE
    if not path.is_file():
        raise UsageError(f"{run_dir}: not a training run folder (no {SETTINGS_FILE})")
    return load_settings(path, environ={})


def step_batches(
    num_images: int, settings: Settings, epoch: int, first_step: int, dist: Distributed
) -> Iterator[list[int]]:
    """This rank's micro-batches of dataset indices for `epoch`, from step `first_step` on.

    Each step takes the next `batch_size` images of a seeded permutation (the same on every
    rank), split over ranks and then into `grad_accumulation` micro-batches.
    """
    train = settings.train
    generator = torch.Generator().manual_seed(train.seed * 1_000_003 + epoch)
    order = torch.randperm(num_images, generator=generator).tolist()
    per_rank = train.batch_size // dist.world_size
    micro = per_rank // train.grad_accumulation
    for step in range(first_step, num_images // train.batch_size):
        global_batch = order[step * train.batch_size : (step + 1) * train.batch_size]
        mine = global_batch[dist.rank * per_rank : (dist.rank + 1) * per_rank]
        for start in range(0, per_rank, micro):
            yield mine[start : start + micro]


def check_batching(settings: Settings, num_images: int, dist: Distributed) -> int:
    """Steps per epoch; a one-line error when the batch cannot be split as asked."""
    train = settings.train
    per_rank, remainder = divmod(train.batch_size, dist.world_size)
    if remainder or per_rank % train.grad_accumulation:
        raise UsageError(
            f"train.batch_size {train.batch_size} must split evenly over {dist.world_size} "
            f"process(es) and {train.grad_accumulation} accumulation step(s)"
        )
    if num_images < train.batch_size:
        raise UsageError(
            f"the training set has {num_images} images, fewer than train.batch_size "
            f"{train.batch_size}"
        )
    check_micro_batch(settings, dist.world_size)
    return num_images // train.batch_size


def make_loader(
    dataset: DistillationDataset,
    settings: Settings,
    epoch: int,
    first_step: int,
    dist: Distributed,
    device: torch.device,
) -> DataLoader:
    dataset.set_epoch(epoch)
    batches = list(step_batches(len(dataset), settings, epoch, first_step, dist))
    return DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=settings.data.num_workers,
        collate_fn=collate_training,
        pin_memory=device.type == "cuda",
        # Its own generator: starting an iterator draws the workers' base seed, which from the
        # global generator would shift the dropout of LoRA adapters on resuming mid-epoch.
        generator=torch.Generator().manual_seed(settings.train.seed + epoch),
    )


def augmentation_of(settings: Settings) -> Augmentation:
    augment = settings.train.augment
    return Augmentation(
        augment.brightness,
        augment.contrast,
        augment.flip,
        crop_scale=augment.crop_scale or (1.0, 1.0),
        scale_jitter=augment.scale_jitter,
        rotate90=augment.rotate90,
    )
