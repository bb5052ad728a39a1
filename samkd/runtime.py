"""Run-time helpers shared by the jobs: device choice and progress bars."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
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
    return device


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
