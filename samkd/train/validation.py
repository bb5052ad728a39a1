"""Validation during training: every rank evaluates its share of the validation images in
micro-batches, under the run's precision, and one all-reduce of the sums gives every rank the
numbers of the whole set; then the dynamic weight, the best checkpoint and early stopping are
updated the same way on all of them."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from loguru import logger
from rich.console import Console
from rich.table import Table

from samkd.data import Sample, SegmentationDataset
from samkd.evaluate.metrics import empty_mask_warning, empty_masks, mask_iou
from samkd.evaluate.predict import encode_images
from samkd.evaluate.prompts import box_prompts
from samkd.evaluate.quality import decode
from samkd.runtime import Distributed, Precision
from samkd.settings import Settings
from samkd.train.batches import DistillationDataset, TrainingBatch, collate_training
from samkd.train.forward import group_targets, prompt_groups
from samkd.train.metrics_log import MetricsLog
from samkd.train.progress import Progress
from samkd.train.step import DistillationStep
from samkd.train.teachers import Teacher, teacher_features
from samkd.train.terms import UnitCounts


@dataclass
class Validation:
    """What validation needs: the images with masks (for mIoU) and, when teacher features
    are available for them, the same images paired with those features (for val/kd_loss)."""

    images: SegmentationDataset
    with_teachers: DistillationDataset | None
    teachers: list[Teacher]
    device: torch.device
    precision: Precision
    batch_size: int


def my_batches(num_images: int, batch_size: int, dist: Distributed) -> list[list[int]]:
    """This rank's share of `range(num_images)` (every `world_size`-th image), in batches."""
    mine = list(range(dist.rank, num_images, dist.world_size))
    return [mine[start : start + batch_size] for start in range(0, len(mine), batch_size)]


def box_ious(
    student: Any, samples: list[Sample], precision: Precision
) -> tuple[torch.Tensor, torch.Tensor]:
    """Box-prompted single-mask IoU of every object of `samples`, and whether its predicted
    mask is empty (`N` float32 and `N` bool, on the CPU)."""
    ious, empty = [], []
    with precision.autocast(student.device):
        embeddings = encode_images(student, torch.stack([s.image for s in samples]))
        for embedding, sample in zip(embeddings, samples, strict=True):
            if sample.masks.shape[0]:
                prompts, masks = box_prompts(sample.masks), sample.masks
                predicted = decode(
                    student, embedding[None], prompts, masks, sample.original_size, "single"
                )
                ious.append(mask_iou(predicted, masks))
                empty.append(empty_masks(predicted))
    if not ious:
        return torch.zeros(0), torch.zeros(0, dtype=torch.bool)
    return torch.cat(ious), torch.cat(empty)


@torch.no_grad()
def term_sums(
    step_module: DistillationStep, batch: TrainingBatch, validation: Validation
) -> tuple[torch.Tensor, torch.Tensor]:
    """The term sums and unit counts (`K` each) of one validation batch."""
    device, schema = validation.device, step_module.schema
    batch = batch.to(device)
    groups = prompt_groups(batch, device)
    counts = UnitCounts(batch.images.shape[0], sum(len(group.objects) for group in groups))
    unit_counts = schema.unit_counts(counts.vector(device), last_micro_step=True)
    no_weights = torch.zeros(2, len(schema), device=device)
    targets = group_targets(batch, groups) if groups else None
    with validation.precision.autocast(device):
        features = teacher_features(validation.teachers, batch, groups, step_module.decoder_taps)
        _, sums = step_module(batch.images, groups, targets, features, unit_counts, no_weights)
    return sums, unit_counts


@dataclass(frozen=True)
class ValidationNumbers:
    """Box mIoU of the student over the labelled objects of the validation set, the share of
    those objects whose predicted mask is empty, and the distillation loss before
    `lambda_kd` (each term's mean over the set, weighted; NaN without teacher features)."""

    miou: float
    empty_fraction: float
    kd_loss: float


def validation_numbers(
    step_module: DistillationStep, validation: Validation, dist: Distributed
) -> ValidationNumbers:
    """The numbers of the whole validation set, on every rank (see `ValidationNumbers`)."""
    step_module.eval()
    objective = step_module.objective
    # Ranks validate different numbers of batches; sampled RKD positions must stay in step.
    rkd_state = None if objective is None else objective.rkd_generator.get_state()
    schema = step_module.schema
    size = len(schema)
    # IoUs, objects, empty masks, then the term sums and unit counts
    totals = torch.zeros(3 + 2 * size, device=validation.device)
    for indices in my_batches(len(validation.images), validation.batch_size, dist):
        if validation.with_teachers is None:
            samples = [validation.images[index] for index in indices]
        else:
            batch = collate_training([validation.with_teachers[index] for index in indices])
            samples = [item.sample for item in batch.samples]
            sums, counts = term_sums(step_module, batch, validation)
            totals[3 : 3 + size] += sums
            totals[3 + size :] += counts
        ious, empty = box_ious(step_module.student, samples, validation.precision)
        totals[0] += ious.sum().to(validation.device)
        totals[1] += ious.numel()
        totals[2] += empty.sum().to(validation.device)
    if dist.enabled:
        torch.distributed.all_reduce(totals)
    if objective is not None and rkd_state is not None:
        objective.rkd_generator.set_state(rkd_state)
    values = totals.tolist()
    miou = values[0] / values[1] if values[1] else 0.0
    empty_fraction = values[2] / values[1] if values[1] else 0.0
    if validation.with_teachers is None or objective is None:
        return ValidationNumbers(miou, empty_fraction, math.nan)
    specs = objective.term_specs()
    set_sums, set_counts = values[3 : 3 + size], values[3 + size :]
    kd_loss = sum(
        specs[name][0] * total / count
        for name, total, count in zip(schema.names, set_sums, set_counts, strict=True)
        if name in specs and count
    )
    return ValidationNumbers(miou, empty_fraction, kd_loss)


def validate_and_adapt(
    step_module: DistillationStep,
    validation: Validation | None,
    progress: Progress,
    settings: Settings,
    dist: Distributed,
    log: MetricsLog | None,
    console: Console,
    checkpoint: Callable[[Path], None],
) -> bool:
    """Validate on every rank, then update the dynamic weight, the best checkpoint and early
    stopping the same way on all of them. Returns True when training should stop early."""
    if validation is None:
        return False
    numbers = validation_numbers(step_module, validation, dist)
    miou = numbers.miou
    record: dict[str, Any] = {
        "kind": "val",
        "step": progress.step,
        "val/miou": miou,
        "val/empty_fraction": numbers.empty_fraction,
    }
    if not math.isnan(numbers.kd_loss):
        record["val/kd_loss"] = numbers.kd_loss
    objective = step_module.objective
    if objective is not None and settings.distillation.dynamic_lambda.enabled:
        change = objective.kd_weight.step(record[settings.distillation.dynamic_lambda.metric])
        if change is not None:
            record["lambda_kd_change"] = [change.old, change.new]
        record["lambda_kd"] = objective.kd_weight.value
    if progress.best_metric is None or miou > progress.best_metric:
        progress.best_metric, progress.best_step = miou, progress.step
        progress.evals_without_improvement = 0
        checkpoint(settings.train.output_dir / "checkpoints" / "best.pt")
    else:
        progress.evals_without_improvement += 1
    if log is not None:
        log.write(record)
        console.print(validation_table(record, progress))
        warning = empty_mask_warning(numbers.empty_fraction, f"validation at step {progress.step}")
        if warning is not None:
            logger.warning(warning)
    patience = settings.train.early_stop_patience
    return patience is not None and progress.evals_without_improvement >= patience


def validation_table(record: dict[str, Any], progress: Progress) -> Table:
    table = Table(title=f"validation at step {record['step']}", title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in record.items():
        if name not in ("kind", "step"):
            table.add_row(name, f"{value:.4f}" if isinstance(value, float) else str(value))
    table.add_row("best val/miou", f"{progress.best_metric:.4f} (step {progress.best_step})")
    return table
