"""What every job (extract, train, eval) shares at run time: the device, the precision, the
process group under torchrun, and progress bars."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from samkd.errors import UsageError
from samkd.models import default_image_size
from samkd.settings import Settings


def input_image_size(settings: Settings) -> int:
    """The side of every model input: `data.image_size`, else the student's own size, so that
    teachers, stored features and the student agree."""
    return settings.data.image_size or default_image_size(settings.student.model_type)


def resolve_device(name: str) -> torch.device:
    """`auto` is the first CUDA device when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device '{name}' was asked for, but CUDA is not available here")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UsageError(
            f"device '{name}' was asked for, but there are {torch.cuda.device_count()} CUDA "
            "devices here"
        )
    return device


@dataclass(frozen=True)
class Precision:
    """How a job computes: `name` (fp32, bf16 or fp16), the autocast dtype (None: float32)
    and whether training needs a GradScaler."""

    name: str
    dtype: torch.dtype | None
    use_scaler: bool

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager[object]:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.dtype)


def resolve_precision(name: str, device: torch.device) -> Precision:
    """auto: bf16 on CUDA, float32 elsewhere; fp16 (CUDA only) adds a GradScaler."""
    if name == "auto":
        name = "bf16" if device.type == "cuda" else "fp32"
    if name == "fp32":
        return Precision(name, None, False)
    if name == "bf16":
        return Precision(name, torch.bfloat16, False)
    if device.type != "cuda":
        raise UsageError(f"precision fp16 needs a CUDA device, got '{device}'; use fp32 or bf16")
    return Precision(name, torch.float16, True)


@contextmanager
def deterministic_on_cpu(device: torch.device) -> Iterator[None]:
    """Deterministic kernels while a CPU job runs; the previous setting is restored after.

    Some CPU kernels add with parallel float atomics, so their sums depend on thread timing:
    `index_put_(accumulate=True)` on 32768 or more elements with several threads (the backward
    of TinyViT's attention-bias lookup) made two training runs differ on a loaded machine.
    Deterministic mode runs them serially. CUDA is left alone: there the mode rejects some
    kernels and needs a cuBLAS workspace setting.
    """
    if device.type != "cpu":
        yield
        return
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


@dataclass(frozen=True)
class Distributed:
    """This process's place in the job (`world_size` 1 without torchrun)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str) -> Distributed:
    """Join the process group that torchrun describes in the environment, if any.

    NCCL on CUDA, gloo on the CPU; each rank uses the GPU of its local rank.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Distributed()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_name != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not torch_dist.is_initialized():
        torch_dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Distributed(rank, local_rank, world_size)


def device_for(dist: Distributed, device: torch.device) -> torch.device:
    """Under torchrun each rank drives its own GPU."""
    if dist.enabled and device.type == "cuda":
        return torch.device("cuda", dist.local_rank)
    return device


def barrier(dist: Distributed) -> None:
    if dist.enabled:
        torch_dist.barrier()


def shutdown(dist: Distributed) -> None:
    if dist.enabled and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


class RateColumn(ProgressColumn):
    """Items per second, e.g. `12.3 img/s`."""

    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("-" if speed is None else f"{speed:.2f} {self.unit}/s", style="cyan")


@contextmanager
def progress_bar(unit: str = "img", console: Console | None = None) -> Iterator[Progress]:
    """A rich progress display with count, throughput, elapsed time and ETA."""
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(unit),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console or Console(stderr=True),
        transient=False,
    )
    with progress:
        yield progress
