"""`samkd train`: the training loop, in the order it runs."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from loguru import logger
from rich.console import Console
from rich.table import Table
from torch.nn.parallel import DistributedDataParallel

from samkd import __version__
from samkd.data import summarize_skipped
from samkd.errors import UsageError
from samkd.files import check_writable
from samkd.models import save_state_dict
from samkd.models.lora import merged_state_dict
from samkd.runtime import (
    Distributed,
    barrier,
    deterministic_on_cpu,
    device_for,
    init_distributed,
    progress_bar,
    resolve_device,
    resolve_precision,
    shutdown,
)
from samkd.settings import Settings
from samkd.train import setup
from samkd.train.batches import DistillationDataset
from samkd.train.metrics_log import MetricsLog
from samkd.train.optim import build_optimizer, build_scheduler, scheduled_lr
from samkd.train.progress import Progress, Tallies
from samkd.train.prompt_loop import PromptLoop
from samkd.train.state import (
    check_finite_weights,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from samkd.train.step import DistillationStep, StepParts, train_step
from samkd.train.teacher_masks import label_free_of
from samkd.train.validation import validate_and_adapt

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
    device = device_for(dist, resolve_device(settings.train.device))
    try:
        with deterministic_on_cpu(device):
            resuming = resume is not None
            return _train(settings, resuming, dist, device, console or Console(stderr=True))
    finally:
        shutdown(dist)


def _train(
    settings: Settings,
    resuming: bool,
    dist: Distributed,
    device: torch.device,
    console: Console,
) -> TrainResult:
    # ---- precision, seeds
    precision = resolve_precision(settings.train.precision, device)
    torch.manual_seed(settings.train.seed)
    run_dir = settings.train.output_dir
    checkpoint_path = run_dir / "checkpoints" / "last.pt"
    if not resuming and checkpoint_path.exists():
        raise UsageError(f"{run_dir}: already holds a run; resume it with --resume {run_dir}")
    if dist.is_main:
        check_writable(run_dir, "train.output_dir")

    # ---- student (first, so its initialisation does not depend on the teacher mode), data,
    # ---- teachers, objective
    student = setup.build_student(settings, device)
    train_data = setup.build_train_dataset(settings)
    # After the feature file's check: it leaves out the images that extraction skipped.
    objective, store, teachers = setup.build_distillation(settings, student, train_data, device)
    steps_per_epoch = setup.check_batching(settings, len(train_data), dist)
    schema = setup.build_schema(settings, objective).to(device)
    step_module = DistillationStep(
        student, objective, schema, settings.train.task_loss, PromptLoop.of(settings.train)
    )
    step_module.to(device)
    if settings.train.channels_last:
        student.image_encoder.to(memory_format=torch.channels_last)
    ddp = None
    if dist.enabled:
        # Every trainable parameter takes part in every step (the step's decoder anchor), so
        # DDP needs no search for unused ones.
        ddp = DistributedDataParallel(step_module, find_unused_parameters=False)
        logger.info("DDP over {} ranks, find_unused_parameters=False", dist.world_size)
    trained: torch.nn.Module = step_module if ddp is None else ddp
    forward: Any = torch.compile(trained) if settings.train.compile else trained
    label_free = label_free_of(settings, train_data, store, teachers, precision, console, dist)
    dataset = DistillationDataset(
        train_data, store, setup.augmentation_of(settings), settings.train.seed, label_free
    )
    validation = setup.build_validation(settings, teachers, device, precision, dist)

    # ---- optimizer, schedule, resume
    lr_scales = setup.lr_scales(settings, student)
    optimizer = build_optimizer(
        [step_module], settings.train.lr, settings.train.weight_decay, lr_scales
    )
    scheduler = build_scheduler(optimizer, settings.train.warmup_steps, settings.train.steps)
    scaler = torch.amp.GradScaler(device.type, enabled=precision.use_scaler)
    progress = Progress(schema.names, device)
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
        check_finite_weights(step_module, progress.step, checkpoint_path)  # on every rank
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
    parts = StepParts(forward, ddp, teachers, optimizer, scaler, settings, precision, device, dist)
    total_steps = settings.train.steps
    stopped_early = False
    last_log_time = time.perf_counter()
    last_record: dict[str, Any] = {}
    skipped: set[str] = set()  # images, masks and feature rows left out under on_error=skip
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
                skipped.update(m for batch in micro_batches for m in batch.skipped)
                bar.update(task, completed=progress.step)
                if progress.step % settings.logging.log_every == 0:
                    last_record, tallies = log_training(
                        progress, dist, epoch, scheduled_lr(scheduler, settings.train.lr),
                        objective, log, images_since_log, last_log_time,
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

    if skipped:
        logger.warning(f"data.on_error=skip: {summarize_skipped(skipped)}")

    # ---- export
    exported = None
    check_finite_weights(student, progress.step, checkpoint_path)
    if dist.is_main:
        exported = run_dir / EXPORT_NAME
        save_state_dict(merged_state_dict(student, settings.student.lora), exported)
        layout = f"{settings.student.model_type}, segment-anything state-dict layout"
        console.print(f"exported the student ({layout}) to {exported}")
    if log is not None:
        log.close()
    barrier(dist)
    return TrainResult(run_dir, progress.step, progress.best_metric, exported, stopped_early)


def grouped(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Consecutive lists of `size` items (the last may be shorter): the micro-batches of
    each step."""
    iterator = iter(items)
    while group := list(itertools.islice(iterator, size)):
        yield group


def log_training(
    progress: Progress,
    dist: Distributed,
    epoch: int,
    lr: float,
    objective: Any,
    log: MetricsLog | None,
    images: int,
    since: float,
) -> tuple[dict[str, Any], Tallies]:
    """Read the tallies back (the sync of a logging step), write the training record, and
    start the next record's tallies. `lr`: that of scale 1 (`train.lr` through the schedule);
    `images` were trained on since `since` (a `time.perf_counter()` value)."""
    progress.reduce_over_ranks(dist)
    tallies = progress.read()
    # Timed after the read: the device has finished the steps only then.
    images_per_s = images / (time.perf_counter() - since)
    progress.reset_terms()
    record = train_record(progress.step, epoch, lr, objective, tallies, images_per_s)
    if log is not None:
        log.write(record)
    return record, tallies


def loss_text(record: dict[str, Any]) -> str:
    value = record.get("loss/total")
    return "-" if value is None else f"{value:.4f}"


def train_record(
    step: int, epoch: int, lr: float, objective: Any, tallies: Tallies, images_per_s: float
) -> dict[str, Any]:
    """The training record of a logging step: the means of the terms over the steps kept
    since the last record, and the skipped steps (in all, and the terms that were non-finite
    in those since the last record)."""
    record: dict[str, Any] = {
        "kind": "train",
        "step": step,
        "epoch": epoch,
        "lr": lr,
        "lambda_kd": None if objective is None else objective.kd_weight.value,
        "images_per_s": images_per_s,
        "skipped_steps": tallies.skipped_total,
    }
    if tallies.nonfinite_terms:
        record["nonfinite_terms"] = tallies.nonfinite_terms
    record.update(tallies.means)
    return record


def terms_table(record: dict[str, Any]) -> Table:
    """Every loss term of the latest training record, as logged."""
    table = Table(title=f"loss terms at step {record['step']}", title_justify="left")
    table.add_column("term")
    table.add_column("value", justify="right")
    for name, value in record.items():
        if "/" in name and isinstance(value, float):
            table.add_row(name, f"{value:.5g}")
    return table
