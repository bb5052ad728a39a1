"""Running extractions for the fault tests: command lines, one-thread processes, tmpfs."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

PATCHED_EXTRACT = Path(__file__).with_name("patched_extract.py")
# Bitwise comparisons between processes need one thread: a loaded machine must not change
# how CPU kernels split their reductions.
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}
# The `tmpfs` fixture: `tmpfs(name, size, read_only=False)` mounts one, returns its folder.
Mount = Callable[..., Path]


def extract_arguments(data: Path, output: Path, *extra: str) -> list[str]:
    """`samkd extract` of a seeded random vit_mini teacher at 256 px, two images a shard."""
    return [
        "extract", "--teacher", "vit_mini", "--data", str(data), "--output", str(output),
        "--set", "student.model_type=vit_t_mini", "--set", "data.num_workers=0",
        "--set", "extract.shard_size=2", "--set", "extract.batch_size=2", *extra,
    ]  # fmt: skip


def extract_process(
    data: Path, output: Path, *extra: str, patches: tuple[str, ...] = ()
) -> list[str]:
    """The command line of an extraction in a process of its own (`patched_extract.py`)."""
    arguments = extract_arguments(data, output, *extra)
    return [sys.executable, str(PATCHED_EXTRACT), *patches, "--", *arguments]


def run_extract_process(
    data: Path, output: Path, *extra: str, patches: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    command = extract_process(data, output, *extra, patches=patches)
    return subprocess.run(command, capture_output=True, text=True, env=ONE_THREAD, timeout=300)


def remount(folder: Path, options: str) -> None:
    """Change a mounted tmpfs (e.g. "size=64m", "ro"), keeping its files."""
    subprocess.run(["mount", "-o", f"remount,{options}", str(folder)], check=True)


def files_under(folder: Path) -> list[str]:
    """Every file and folder under `folder`, relative, sorted."""
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*"))
