"""`samkd train`: the training loop, in the order it runs."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
from samkd.runtime import input_image_size, progress_bar, resolve_device
from samkd.settings import Settings
from samkd.train import setup
from samkd.train.batches import DistillationDataset, TrainingBatch, collate_training
from samkd.train.distributed import Distributed, barrier, device_for, init_distributed, shutdown
from samkd.train.forward import group_targets, prompt_groups
from samkd.train.metrics_log import MetricsLog
from samkd.train.optim import build_optimizer, build_scheduler
from samkd.train.state import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from samkd.train.step import DistillationStep
from samkd.train.teachers import Teacher, teacher_features

EXPORT_NAME = "student.pt"


class NonFiniteLossError(UsageError):
    """Too many consecutive steps had a non-finite loss."""


@dataclass
class Progress:
    """What a checkpoint must carry besides the weights, so a resumed run continues exactly."""

    step: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    consecutive_skipped: int = 0
    skipped_total: int = 0
    log_sums: dict[str, torch.Tensor] = field(default_factory=dict)
    log_count: int = 0

    def state_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)


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
    precision = setup.resolve_precision(settings.train.precision, device)
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
    optimizer = build_optimizer(
        [step_module], settings.train.lr, settings.train.weight_decay, device
    )
    scheduler = build_scheduler(optimizer, settings.train.warmup_steps, settings.train.steps)
    scaler = torch.amp.GradScaler(device.type, enabled=precision.use_scaler)
    progress = Progress()
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

    # ---- the loop
    setup.set_train_mode(student, frozen_bn)
    total_steps = settings.train.steps
    accumulation = settings.train.grad_accumulation
    stopped_early = False
    last_log_time = time.perf_counter()
    last_record: dict[str, Any] = {}
    images_since_log = 0
    with progress_bar(unit="step", console=console) as bar:
        task = bar.add_task("training", total=total_steps, completed=progress.step)
        while progress.step < total_steps and not stopped_early:
            epoch, step_in_epoch = divmod(progress.step, steps_per_epoch)
            loader = setup.make_loader(dataset, settings, epoch, step_in_epoch, dist, device)
            for micro, batch in enumerate(loader):
                loss, terms = micro_step(
                    forward, batch.to(device), teachers, device, precision, accumulation
                )
                images_since_log += batch.images.shape[0] * dist.world_size
                if not all_finite(loss, dist):
                    handle_nonfinite(terms, progress, settings, checkpoint, checkpoint_path)
                    optimizer.zero_grad(set_to_none=True)
                    if (micro + 1) % accumulation:
                        continue
                else:
                    scaler.scale(loss).backward()
                    accumulate(progress, terms)
                    if (micro + 1) % accumulation:
                        continue
                    optimizer_step(step_module, optimizer, scaler, settings, progress.step)
                    progress.consecutive_skipped = 0
                scheduler.step()
                progress.step += 1
                bar.update(task, completed=progress.step)
                if progress.step % settings.logging.log_every == 0:
                    average_over_ranks(progress, dist)
                    elapsed = time.perf_counter() - last_log_time
                    record = train_record(
                        progress, epoch, scheduler, objective, images_since_log / elapsed
                    )
                    last_record = record
                    if log is not None:
                        log.write(record)
                    loss_text = f"{record['loss/total']:.4f}" if "loss/total" in record else "-"
                    bar.update(task, description=f"training loss {loss_text}")
                    last_log_time, images_since_log = time.perf_counter(), 0
                if progress.step % settings.train.val_every == 0 or progress.step == total_steps:
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


def micro_step(
    forward: Any,
    batch: TrainingBatch,
    teachers: list[Teacher],
    device: torch.device,
    precision: setup.Precision,
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
) -> None:
    """Drop the gradients of parts still frozen at `step`, clip, and update."""
    for part, first_step in settings.train.frozen_until.items():
        if first_step == -1 or step < first_step:
            for parameter in getattr(step_module.student, part).parameters():
                parameter.grad = None
    scaler.unscale_(optimizer)
    if settings.train.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(step_module.parameters(), settings.train.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def all_finite(loss: torch.Tensor, dist: Distributed) -> bool:
    """Whether every rank's loss is finite (ranks must agree to skip a step together)."""
    finite = torch.isfinite(loss.detach()).float()
    if dist.enabled:
        torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
    return bool(finite)


def average_over_ranks(progress: Progress, dist: Distributed) -> None:
    """Logged terms are means over the whole global batch, not rank 0's share."""
    if not dist.enabled:
        return
    for name in sorted(progress.log_sums):
        torch.distributed.all_reduce(progress.log_sums[name])
        progress.log_sums[name] /= dist.world_size


def accumulate(progress: Progress, terms: dict[str, torch.Tensor]) -> None:
    """Sum terms on the device; they are read back (one sync) only at logging steps."""
    for name, value in terms.items():
        value = value.detach().float()
        progress.log_sums[name] = (
            progress.log_sums[name] + value if name in progress.log_sums else value
        )
    progress.log_count += 1


def handle_nonfinite(
    terms: dict[str, torch.Tensor],
    progress: Progress,
    settings: Settings,
    checkpoint: Any,
    checkpoint_path: Path,
) -> None:
    """Skip the step, name the offending terms, and abort after too many in a row."""
    bad = sorted(name for name, value in terms.items() if not torch.isfinite(value).all())
    progress.consecutive_skipped += 1
    progress.skipped_total += 1
    logger.warning(
        f"step {progress.step}: non-finite loss in {', '.join(bad) or 'the total'}; skipped"
    )
    if progress.consecutive_skipped >= settings.train.max_nonfinite_steps:
        raise NonFiniteLossError(
            f"{progress.consecutive_skipped} consecutive steps had a non-finite loss "
            f"({', '.join(bad) or 'total'}); stopped at step {progress.step}, the last good "
            f"checkpoint is {checkpoint_path}"
        )


def train_record(
    progress: Progress, epoch: int, scheduler: Any, objective: Any, images_per_s: float
) -> dict[str, Any]:
    record: dict[str, Any] = {
        "kind": "train",
        "step": progress.step,
        "epoch": epoch,
        "lr": scheduler.get_last_lr()[0],
        "lambda_kd": None if objective is None else objective.kd_weight.value,
        "images_per_s": images_per_s,
        "skipped_steps": progress.skipped_total,
    }
    count = max(1, progress.log_count)
    record.update({name: float(total) / count for name, total in progress.log_sums.items()})
    progress.log_sums, progress.log_count = {}, 0
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
