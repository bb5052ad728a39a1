"""Measuring a command as a user runs it: wall time, peak memory of its process tree and the
bytes it wrote, and the page cache and disk under it.

    usage = run_measured([sys.executable, "-m", "samkd", "inspect", "data/"])
    usage.seconds, usage.peak_rss, usage.peak_tree_pss, usage.written

Peak memory comes from two places: `ru_maxrss` of `wait4` (the command's own peak resident
set, or that of its largest child process, such as a DataLoader worker), and a sampler that
reads the proportional set size (PSS: a page shared by k processes counts 1/k in each) of the
whole tree every `SAMPLE_SECONDS`, so that the workers of a training run count once.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import re
import resource
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from benchmarks.feature_store import drop_page_cache

SAMPLE_SECONDS = 0.25
BLOCK = 512  # the unit of ru_inblock and ru_oublock on Linux
READ_BUFFER = 16 << 20


@dataclass(frozen=True)
class MemorySample:
    seconds: float  # since the command started
    tree_pss: int  # bytes, the sum over the process and its children
    tree_rss: int


@dataclass(frozen=True)
class Usage:
    """What one command cost."""

    seconds: float
    peak_rss: int  # bytes: ru_maxrss, the process's or its largest waited-for child's
    written: int  # bytes written to disk (ru_oublock), the command's and its children's
    samples: list[MemorySample] = field(default_factory=list)

    @property
    def peak_tree_pss(self) -> int:
        return max((s.tree_pss for s in self.samples), default=0)

    @property
    def peak_tree_rss(self) -> int:
        return max((s.tree_rss for s in self.samples), default=0)


class CommandFailed(RuntimeError):
    pass


def tree_memory(process: psutil.Process) -> tuple[int, int]:
    """(PSS, RSS) summed over `process` and its descendants, in bytes."""
    pss = rss = 0
    try:
        members = [process, *process.children(recursive=True)]
    except psutil.Error:
        return 0, 0
    for member in members:
        try:
            info = member.memory_full_info()
        except psutil.Error:
            continue  # exited meanwhile
        pss += getattr(info, "pss", info.rss)
        rss += info.rss
    return pss, rss


def run_measured(
    command: Sequence[str],
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    sample: bool = True,
    timeout: float | None = None,
) -> Usage:
    """Run `command` to its end; raise CommandFailed (with the end of its stderr) when it
    exits non-zero."""
    with tempfile.TemporaryFile() as errors:
        began = time.perf_counter()
        process = subprocess.Popen(
            list(command), stdout=subprocess.DEVNULL, stderr=errors, env=env, cwd=cwd
        )
        samples: list[MemorySample] = []
        done = threading.Event()
        sampler = None
        if sample:
            sampler = threading.Thread(
                target=_sample_until, args=(process.pid, began, samples, done), daemon=True
            )
            sampler.start()
        try:
            status, usage = _wait(process, timeout)
        finally:
            done.set()
            if sampler is not None:
                sampler.join()
        seconds = time.perf_counter() - began
        if status != 0:
            errors.seek(0)
            tail = errors.read()[-3000:].decode(errors="replace")
            raise CommandFailed(f"{' '.join(command)} exited with {status}:\n{tail}")
    return Usage(seconds, usage.ru_maxrss * 1024, usage.ru_oublock * BLOCK, samples)


def _wait(process: subprocess.Popen, timeout: float | None) -> tuple[int, resource.struct_rusage]:
    """The exit status and resource usage of `process` (reaped here, with wait4)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid == process.pid:
            process.returncode = os.waitstatus_to_exitcode(status)
            return process.returncode, usage
        if deadline is not None and time.monotonic() > deadline:
            process.kill()
        time.sleep(0.02)


def _sample_until(
    pid: int, began: float, samples: list[MemorySample], done: threading.Event
) -> None:
    try:
        process = psutil.Process(pid)
    except psutil.Error:
        return
    while not done.is_set():
        pss, rss = tree_memory(process)
        if rss:
            samples.append(MemorySample(time.perf_counter() - began, pss, rss))
        done.wait(SAMPLE_SECONDS)


# --------------------------------------------------------------------------- page cache


def cached_fraction(path: Path) -> float:
    """The fraction of `path`'s pages in the page cache (mincore), to check a drop worked."""
    size = path.stat().st_size
    if size == 0:
        return 0.0
    libc = ctypes.CDLL(None, use_errno=True)
    pages = -(-size // mmap.PAGESIZE)
    resident = (ctypes.c_ubyte * pages)()
    with open(path, "rb") as handle:
        # A private mapping: writable for ctypes, never written, and mapping reads nothing.
        mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
    try:
        anchor = ctypes.c_char.from_buffer(mapped)
        result = libc.mincore(
            ctypes.c_void_p(ctypes.addressof(anchor)), ctypes.c_size_t(size), resident
        )
        del anchor
        if result != 0:
            raise OSError(ctypes.get_errno(), f"mincore failed on {path}")
    finally:
        mapped.close()
    return sum(byte & 1 for byte in resident) / pages


def sequential_read_rate(path: Path, attempts: int = 2) -> tuple[float, str]:
    """Bytes/s of reading `path` from start to end, its pages dropped first, and how: the
    best of `dd` with 16 MiB blocks through the page cache and with O_DIRECT (which skips
    it), `attempts` times each: the fastest the disk was seen to read, a strict baseline.
    Without `dd`: Python reads of 16 MiB."""
    if not shutil.which("dd"):
        drop_page_cache([path])
        buffer = bytearray(READ_BUFFER)
        began = time.perf_counter()
        with open(path, "rb", buffering=0) as handle:
            while handle.readinto(buffer):
                pass
        return path.stat().st_size / (time.perf_counter() - began), "16 MiB reads"
    best, how = 0.0, ""
    for _ in range(attempts):
        for flags, label in (([], "dd bs=16M"), (["iflag=direct"], "dd bs=16M iflag=direct")):
            drop_page_cache([path])
            completed = subprocess.run(
                ["dd", f"if={path}", "of=/dev/null", "bs=16M", *flags],
                capture_output=True,
                text=True,
                check=True,
            )
            match = re.search(r"copied, ([0-9.]+) s", completed.stderr)
            if match and path.stat().st_size / float(match.group(1)) > best:
                best, how = path.stat().st_size / float(match.group(1)), label
    return best, f"best of {attempts} x {{dd bs=16M, with and without iflag=direct}}: {how}"
