"""What every benchmark shares: result sections, the machine description, timing helpers."""

from __future__ import annotations

import datetime
import os
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.table import Table

# Every table reports ratios to a baseline measured in the same run: the machines these run on
# are shared, so absolute numbers move with other people's load while ratios mostly do not.
NOISE_NOTE = (
    "Absolute numbers depend on the machine's load; compare the ratios, whose baseline was "
    "measured in the same run."
)


@dataclass
class ResultTable:
    """A titled table of already formatted cells."""

    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    title: str = ""

    def add(self, *cells: object) -> None:
        self.rows.append([str(cell) for cell in cells])

    def markdown(self) -> str:
        aligns = ["---"] + ["---:"] * (len(self.columns) - 1)
        lines = [f"**{self.title}**", ""] if self.title else []
        lines += [_markdown_row(self.columns), _markdown_row(aligns)]
        lines += [_markdown_row(row) for row in self.rows]
        return "\n".join(lines)

    def rich(self) -> Table:
        table = Table(title=self.title or None, title_justify="left")
        for index, column in enumerate(self.columns):
            table.add_column(column, justify="left" if index == 0 else "right")
        for row in self.rows:
            table.add_row(*row)
        return table


def _markdown_row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


@dataclass
class Section:
    """One benchmark's results, rendered to the console and to a BENCHMARKS.md section."""

    name: str
    title: str
    description: str
    tables: list[ResultTable]
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Machine:
    cpu: str
    cores: int
    torch_threads: int
    torch_version: str
    date: str

    def describe(self) -> str:
        return (
            f"{self.cpu}, {self.cores} cores ({self.torch_threads} torch threads), "
            f"torch {self.torch_version}, {self.date}"
        )


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return "unknown CPU"


def usable_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def this_machine() -> Machine:
    return Machine(
        cpu=cpu_model(),
        cores=usable_cores(),
        torch_threads=torch.get_num_threads(),
        torch_version=torch.__version__,
        date=datetime.date.today().isoformat(),
    )


def section_markdown(section: Section, command: str, machine: Machine, seconds: float) -> str:
    parts = [
        f"## {section.title}",
        "",
        f"Command: `{command}` ({seconds:.0f} s)  ",
        f"Machine: {machine.describe()}",
        "",
        section.description.strip(),
    ]
    for table in section.tables:
        parts += ["", table.markdown()]
    if section.notes:
        parts += [""] + [f"- {note}" for note in section.notes]
    return "\n".join(parts) + "\n"


def seconds_of(function: Callable[[], object]) -> float:
    began = time.perf_counter()
    function()
    return time.perf_counter() - began


def interleaved_seconds(
    functions: Mapping[str, Callable[[], object]], rounds: int
) -> dict[str, list[float]]:
    """Run every function once per round, in turn, so load changes hit them all alike."""
    times: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(rounds):
        for name, function in functions.items():
            times[name].append(seconds_of(function))
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def ratio(value: float, baseline: float) -> str:
    return f"{value / baseline:.2f}x"
