"""`samkd train`: the training loop, in the order it runs."""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from loguru import logger
from rich.console import Console
from rich.table import Table
from torch.nn.parallel import DistributedDataParallel

from samkd import __version__
from samkd.data import SegmentationDataset
from samkd.errors import UsageError
from samkd.evaluate.quality import QualityOptions, QualityTables, evaluate_image
from samkd.models import save_state_dict
from samkd.runtime import (
    Distributed,
    Precision,
    barrier,
    device_for,
    init_distributed,
    input_image_size,
    progress_bar,
    resolve_device,
    resolve_precision,
    shutdown,
)
from samkd.settings import Settings
from samkd.train import setup
from samkd.train.batches import DistillationDataset, TrainingBatch, collate_training
from samkd.train.forward import group_targets, prompt_groups
from samkd.train.metrics_log import MetricsLog
from samkd.train.optim import build_optimizer, build_scheduler
from samkd.train.progress import Progress, StepTerms, Tallies
from samkd.train.state import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from samkd.train.step import DistillationStep
from samkd.train.teachers import Teacher, teacher_features

EXPORT_NAME = "student.pt"
T = TypeVar("T")


@dataclass(frozen=True)
class TrainResult:
    run_dir: Path
    steps: int
    best_metric: float | None
    exported: Path | None
    stopped_early: bool


def run_train(
    settings: Settings, resume: Path | None = None, console: Console | None = None
) -> TrainResult:
    """Train the student as the settings say; `resume` continues the run in that folder."""
    if resume is not None:
        settings = setup.settings_for_resume(resume)
        settings.train.output_dir = resume
    dist = init_distributed(settings.train.device)
    try:
        return _train(settings, resume is not None, dist, console or Console(stderr=True))
    finally:
        shutdown(dist)


def _train(settings: Settings, resuming: bool, dist: Distributed, console: Console) -> TrainResult:
    # ---- devices, precision, seeds
    device = device_for(dist, resolve_device(settings.train.device))
    precision = resolve_precision(settings.train.precision, device)
    torch.manual_seed(settings.train.seed)
    run_dir = settings.train.output_dir
    checkpoint_path = run_dir / "checkpoints" / "last.pt"
    if not resuming and checkpoint_path.exists():
        raise UsageError(f"{run_dir}: already holds a run; resume it with --resume {run_dir}")

    # ---- student (first, so its initialisation does not depend on the teacher mode), data,
    # ---- teachers, objective
    student = setup.build_student(settings, device)
    train_data = setup.build_train_dataset(settings)
    steps_per_epoch = setup.check_batching(settings, len(train_data), dist)
    provisional = setup.build_objective(settings)
    required = (
        {}
        if provisional is None
        else {t.name: provisional.required_teacher_taps(t.name) for t in settings.teachers}
    )
    store = None
    if provisional is not None and settings.distillation.use_precomputed_features:
        store = setup.open_feature_store(
            settings, train_data, {name: setup.stored_taps(taps) for name, taps in required.items()}
        )
    teachers = setup.build_teachers(settings, required, device) if provisional else []
    image_size = input_image_size(settings)
    objective = None
    if provisional is not None:
        student_shapes = setup.probe_student_shapes(
            student, provisional.required_student_taps(), image_size, device
        )
        teacher_shapes = setup.probe_teacher_shapes(store, teachers, image_size, device)
        objective = setup.build_objective(settings, student_shapes, teacher_shapes)
        assert objective is not None
        objective.to(device)
    step_module = DistillationStep(student, objective, settings.train.task_loss).to(device)
    if settings.train.channels_last:
        student.image_encoder.to(memory_format=torch.channels_last)
    trained: torch.nn.Module = step_module
    if dist.enabled:
        trained = DistributedDataParallel(step_module, find_unused_parameters=True)
    forward: Any = torch.compile(trained) if settings.train.compile else trained
    dataset = DistillationDataset(
        train_data, store, setup.augmentation_of(settings), settings.train.seed
    )
    validation = setup.build_validation(settings, teachers, device, precision)

    # ---- optimizer, schedule, resume
    optimizer = build_optimizer([step_module], settings.train.lr, settings.train.weight_decay)
    scheduler = build_scheduler(optimizer, settings.train.warmup_steps, settings.train.steps)
    scaler = torch.amp.GradScaler(device.type, enabled=precision.use_scaler)
    progress = Progress(device)
    log = MetricsLog(run_dir, settings.logging.tensorboard) if dist.is_main else None
    if resuming:
        state = load_checkpoint(checkpoint_path)
        step_module.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        progress.load_state_dict(state["progress"])
        set_rng_state(state["rng"])
        if log is not None:
            log.truncate_after(progress.step)
        if progress.step >= settings.train.steps:
            console.print(f"{run_dir}: finished at step {progress.step}; nothing to resume")
            return TrainResult(run_dir, progress.step, progress.best_metric, None, False)
        logger.info(f"resuming {run_dir} at step {progress.step}")
    elif dist.is_main:
        setup.write_run_files(settings, run_dir)
    frozen_bn = setup.freeze_bn_statistics(settings)

    def checkpoint(path: Path) -> None:
        if dist.is_main:
            state = {
                "model": step_module.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "progress": progress.state_dict(),
                "rng": rng_state(),
                "settings": settings.to_yaml(),
                "samkd_version": __version__,
            }
            save_checkpoint(state, path)

    def check_skipped(tallies: Tallies | None = None) -> None:
        """Read the skip tallies back (a sync: only where the loop waits anyway) and abort
        after too many skipped steps in a row."""
        tallies = progress.read() if tallies is None else tallies
        progress.check_skipped(tallies, settings.train.max_nonfinite_steps, checkpoint_path)

    # ---- the loop: the steps themselves never wait for the device; logging, validation and
    # ---- checkpoints do
    setup.set_train_mode(student, frozen_bn)
    parts = StepParts(forward, teachers, optimizer, scaler, settings, precision, device, dist)
    total_steps = settings.train.steps
    stopped_early = False
    last_log_time = time.perf_counter()
    last_record: dict[str, Any] = {}
    images_since_log = 0
    with progress_bar(unit="step", console=console) as bar:
        task = bar.add_task("training", total=total_steps, completed=progress.step)
        while progress.step < total_steps and not stopped_early:
            epoch, step_in_epoch = divmod(progress.step, steps_per_epoch)
            loader = setup.make_loader(dataset, settings, epoch, step_in_epoch, dist, device)
            for micro_batches in grouped(loader, settings.train.grad_accumulation):
                train_step(parts, micro_batches, progress)
                scheduler.step()
                images_since_log += sum(b.images.shape[0] for b in micro_batches) * dist.world_size
                bar.update(task, completed=progress.step)
                if progress.step % settings.logging.log_every == 0:
                    last_record, tallies = log_training(
                        progress, dist, epoch, scheduler, objective, log,
                        images_since_log, last_log_time,
                    )  # fmt: skip
                    bar.update(task, description=f"training loss {loss_text(last_record)}")
                    last_log_time, images_since_log = time.perf_counter(), 0
                    check_skipped(tallies)
                if progress.step % settings.train.val_every == 0 or progress.step == total_steps:
                    check_skipped()
                    stopped_early = validate_and_adapt(
                        step_module, validation, progress, settings, dist, log, console, checkpoint
                    )
                    if log is not None and validation is not None and last_record:
                        console.print(terms_table(last_record))
                    setup.set_train_mode(student, frozen_bn)
                if (
                    progress.step % settings.train.checkpoint_every == 0
                    or progress.step == total_steps
                ):
                    check_skipped()  # before saving: never write a run that should abort
                    checkpoint(checkpoint_path)
                if progress.step >= total_steps or stopped_early:
                    break

    # ---- export
    exported = None
    if dist.is_main:
        exported = run_dir / EXPORT_NAME
        save_state_dict(student, exported)
        console.print(f"exported the student (MobileSAM layout) to {exported}")
    if log is not None:
        log.close()
    barrier(dist)
    return TrainResult(run_dir, progress.step, progress.best_metric, exported, stopped_early)


@dataclass(frozen=True)
class StepParts:
    """What every training step uses. `forward` is the `DistillationStep`, maybe wrapped in
    DistributedDataParallel and torch.compile."""

    forward: Any
    teachers: list[Teacher]
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    settings: Settings
    precision: Precision
    device: torch.device
    dist: Distributed


def grouped(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Consecutive lists of `size` items (the last may be shorter): the micro-batches of
    each step."""
    iterator = iter(items)
    while group := list(itertools.islice(iterator, size)):
        yield group


def train_step(
    parts: StepParts, micro_batches: Sequence[TrainingBatch], progress: Progress
) -> None:
    """One optimizer step over `micro_batches` (gradients accumulate over them), with no
    host-device sync.

    Backward always runs. When a term of some micro-step is not finite (on any rank), or the
    gradient norm is not, the whole step is skipped on the device (see `optimizer_step`); it
    still counts as a step (the schedule moves on) and `progress` tallies it, for the loop to
    read back at its next logging step, validation or checkpoint.
    """
    terms = StepTerms()
    for batch in micro_batches:
        loss, batch_terms = micro_step(
            parts.forward,
            batch.to(parts.device),
            parts.teachers,
            parts.device,
            parts.precision,
            len(micro_batches),
        )
        parts.scaler.scale(loss).backward()
        terms.add(batch_terms, parts.device)
    skip = terms.nonfinite()
    if parts.dist.enabled:  # ranks must skip a step together; MAX keeps the flag on the device
        torch.distributed.all_reduce(skip, op=torch.distributed.ReduceOp.MAX)
    skip = optimizer_step(
        step_module_of(parts.forward),
        parts.optimizer,
        parts.scaler,
        parts.settings,
        progress.step,
        skip,
    )
    progress.record_step(terms, skip)
    progress.step += 1


def micro_step(
    forward: Any,
    batch: TrainingBatch,
    teachers: list[Teacher],
    device: torch.device,
    precision: Precision,
    accumulation: int,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss (already divided by the accumulation steps) and terms of one micro-batch."""
    groups = prompt_groups(batch, device)
    has_masks = bool(groups) and all(item.sample.masks.shape[0] for item in batch.samples)
    targets = group_targets(batch, groups) if has_masks else None
    taps = step_module_of(forward).decoder_taps
    with precision.autocast(device):
        features = teacher_features(teachers, batch, groups, taps)
        loss, terms = forward(batch.images, groups, targets, features)
    return loss / accumulation, terms


def step_module_of(forward: Any) -> DistillationStep:
    """The DistillationStep inside a DDP wrapper or compiled module."""
    module = getattr(forward, "_orig_mod", forward)
    module = getattr(module, "module", module)
    assert isinstance(module, DistillationStep)
    return module


def optimizer_step(
    step_module: DistillationStep,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    settings: Settings,
    step: int,
    skip: torch.Tensor,
) -> torch.Tensor:
    """Drop the gradients of parts still frozen at `step`, clip, and update, all on the device.

    The update leaves parameters and optimizer state as they are when `skip` (float32 0/1
    scalar) is 1 or, without the fp16 scaler, when the gradient norm is not finite: the fused
    AdamW kernel reads the flag from `optimizer.found_inf`. The fp16 scaler sets that attribute
    itself from its own check of the gradients; gradient overflows are its to handle (it lowers
    its scale, routinely so early in a run), so only `skip` is folded into its check, and a
    skipped step lowers the scale too. Returns the flag the update used.
    """
    for part, first_step in settings.train.frozen_until.items():
        if first_step == -1 or step < first_step:
            for parameter in getattr(step_module.student, part).parameters():
                parameter.grad = None
    scaler.unscale_(optimizer)
    norm = None
    if settings.train.grad_clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(step_module.parameters(), settings.train.grad_clip)
    if scaler.is_enabled():
        # The scaler's (private) per-device flags are what both its step and update read.
        for found_inf in scaler._found_inf_per_device(optimizer).values():
            torch.maximum(found_inf, skip.to(found_inf.device, non_blocking=True), out=found_inf)
    else:
        if norm is None:  # without clipping, the norm only tells whether gradients are finite
            gradients = [p.grad for p in step_module.parameters() if p.grad is not None]
            norm = torch.nn.utils.get_total_norm(gradients)
        skip = torch.maximum(skip, (~torch.isfinite(norm)).float())
        optimizer.found_inf = skip  # type: ignore[attr-defined]
    scaler.step(optimizer)
    scaler.update()
    if hasattr(optimizer, "found_inf"):  # ours; the scaler removes its own
        del optimizer.found_inf
    optimizer.zero_grad(set_to_none=True)
    return skip


def log_training(
    progress: Progress,
    dist: Distributed,
    epoch: int,
    scheduler: Any,
    objective: Any,
    log: MetricsLog | None,
    images: int,
    since: float,
) -> tuple[dict[str, Any], Tallies]:
    """Read the tallies back (the sync of a logging step), write the training record, and
    start the next record's tallies. `images` were trained on since `since` (a
    `time.perf_counter()` value)."""
    progress.reduce_over_ranks(dist)
    tallies = progress.read()
    # Timed after the read: the device has finished the steps only then.
    images_per_s = images / (time.perf_counter() - since)
    progress.reset_terms()
    record = train_record(progress.step, epoch, scheduler, objective, tallies, images_per_s)
    if log is not None:
        log.write(record)
    return record, tallies


def loss_text(record: dict[str, Any]) -> str:
    return f"{record['loss/total']:.4f}" if "loss/total" in record else "-"


def train_record(
    step: int, epoch: int, scheduler: Any, objective: Any, tallies: Tallies, images_per_s: float
) -> dict[str, Any]:
    """The training record of a logging step: the means of the terms over the steps kept
    since the last record, and the skipped steps (in all, and the terms that were non-finite
    in those since the last record)."""
    record: dict[str, Any] = {
        "kind": "train",
        "step": step,
        "epoch": epoch,
        "lr": scheduler.get_last_lr()[0],
        "lambda_kd": None if objective is None else objective.kd_weight.value,
        "images_per_s": images_per_s,
        "skipped_steps": tallies.skipped_total,
    }
    if tallies.nonfinite_terms:
        record["nonfinite_terms"] = tallies.nonfinite_terms
    record.update(tallies.means)
    return record


def validation_miou(student: Any, dataset: SegmentationDataset) -> float:
    """Box-prompted single-mask mIoU of the student over the validation set."""
    student.eval()
    tables = QualityTables()
    options = QualityOptions(("box",), multimask=False)
    for index in range(len(dataset)):
        sample = dataset[index]
        if sample.masks.shape[0]:
            evaluate_image(
                tables, options, sample.image, sample.masks, sample.original_size, student
            )
    return tables.model.mean("box", "single") or 0.0


def validation_kd_loss(step_module: DistillationStep, validation: setup.Validation) -> float:
    """Mean weighted distillation loss over the validation images (NaN when unavailable)."""
    if validation.with_teachers is None or step_module.objective is None:
        return math.nan
    step_module.eval()
    losses = []
    with torch.no_grad():
        for index in range(len(validation.with_teachers)):
            batch = collate_training([validation.with_teachers[index]]).to(validation.device)
            _, terms = micro_step(
                step_module, batch, validation.teachers, validation.device, validation.precision, 1
            )
            if "kd/weighted" in terms:
                losses.append(float(terms["kd/weighted"]))
    return sum(losses) / len(losses) if losses else math.nan


def validate_and_adapt(
    step_module: DistillationStep,
    validation: setup.Validation | None,
    progress: Progress,
    settings: Settings,
    dist: Distributed,
    log: MetricsLog | None,
    console: Console,
    checkpoint: Any,
) -> bool:
    """Validate on the main process, share the numbers with every rank, then update the
    dynamic weight, the best checkpoint and early stopping the same way on all of them.

    Returns True when training should stop early.
    """
    if validation is None:
        return False
    values = torch.full((2,), math.nan, device=validation.device)
    if dist.is_main:
        values[0] = validation_miou(step_module.student, validation.images)
        values[1] = validation_kd_loss(step_module, validation)
    if dist.enabled:
        torch.distributed.broadcast(values, src=0)
    miou, kd_loss = values.tolist()
    record: dict[str, Any] = {"kind": "val", "step": progress.step, "val/miou": miou}
    if not math.isnan(kd_loss):
        record["val/kd_loss"] = kd_loss
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
    patience = settings.train.early_stop_patience
    return patience is not None and progress.evals_without_improvement >= patience


def terms_table(record: dict[str, Any]) -> Table:
    """Every loss term of the latest training record, as logged."""
    table = Table(title=f"loss terms at step {record['step']}", title_justify="left")
    table.add_column("term")
    table.add_column("value", justify="right")
    for name, value in record.items():
        if "/" in name and isinstance(value, float):
            table.add_row(name, f"{value:.5g}")
    return table


def validation_table(record: dict[str, Any], progress: Progress) -> Table:
    table = Table(title=f"validation at step {record['step']}", title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in record.items():
        if name not in ("kind", "step"):
            table.add_row(name, f"{value:.4f}" if isinstance(value, float) else str(value))
    table.add_row("best val/miou", f"{progress.best_metric:.4f} (step {progress.best_step})")
    return table
