"""SIGKILL at random moments, rerun, and the file is bitwise what an uninterrupted run writes."""

from __future__ import annotations

import contextlib
import os
import random
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from samkd.features import inspect_feature_file, open_for_extraction
from samkd.features.schema import parts_dir

from .feature_helpers import KILL_PLAN, PSEUDO_MASKS, extract, make_plan, read_datasets, write_all

SCRIPT = Path(__file__).with_name("extract_script.py")
SLEEP_PER_BATCH = 0.03
KILL_POINTS = 4


class Extractions:
    """`extract_script.py --serve`: every run is forked from one process that has done its
    imports, so that a run starts at once, as the extraction under test (an interpreter
    importing torch would spend seconds before it)."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(SCRIPT), "--serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.readline() == "ready"

    def readline(self) -> str:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        assert line, f"the extraction server ended ({self.process.poll()})"
        return line.strip()

    def start(self, output: Path, *extra: str) -> tuple[int, list[str]]:
        """Start a run; its pid, and the lines it printed so far."""
        assert self.process.stdin is not None
        command = [str(output), "--sleep", str(SLEEP_PER_BATCH), *extra]
        self.process.stdin.write(shlex.join(command) + "\n")
        self.process.stdin.flush()
        lines = []
        while not (line := self.readline()).startswith("started "):
            lines.append(line)
        return int(line.split()[1]), lines

    def wait(self, lines: list[str]) -> tuple[str, int]:
        """What the run printed, and its exit status (-9: SIGKILL), once it has ended."""
        while not (line := self.readline()).startswith("ended "):
            lines.append(line)
        return "\n".join(lines), int(line.split()[2])

    def close(self) -> None:
        self.process.kill()  # idle: nothing of it to keep
        self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def extractions() -> Iterator[Extractions]:
    server = Extractions()
    yield server
    server.close()


def run_to_end(extractions: Extractions, output: Path, *extra: str) -> tuple[str, float]:
    """Run to completion; what it printed and the seconds it took."""
    began = time.perf_counter()
    out, code = extractions.wait(extractions.start(output, *extra)[1])
    assert code == 0, out
    return out, time.perf_counter() - began


def kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # it has ended and been reaped
        os.kill(pid, signal.SIGKILL)


def kill_at(extractions: Extractions, output: Path, seconds: float) -> bool:
    """Start a run, SIGKILL it `seconds` later; True if it was still running."""
    pid, lines = extractions.start(output)
    time.sleep(seconds)
    kill(pid)
    return extractions.wait(lines)[1] == -signal.SIGKILL


def assert_not_corrupt(output: Path) -> None:
    """A kill leaves nothing (it came before the first write), an unfinished extraction or
    the finished file: never a corrupt one."""
    if output.exists() or parts_dir(output).exists():
        assert inspect_feature_file(output).status in {"incomplete", "complete"}


def test_sigkill_at_random_points_then_resume_is_bitwise_identical(
    tmp_path: Path, extractions: Extractions
) -> None:
    reference = tmp_path / "reference" / "features.h5"
    reference.parent.mkdir()
    _, duration = run_to_end(extractions, reference)
    expected = read_datasets(reference)

    rng = random.Random(1234)
    kills = 0
    for point in range(KILL_POINTS):
        output = tmp_path / f"killed-{point}" / "features.h5"
        output.parent.mkdir()
        kills += kill_at(extractions, output, rng.uniform(0.0, duration))
        assert_not_corrupt(output)
        kills += kill_at(extractions, output, rng.uniform(0.0, duration / 2))  # the rerun too
        assert_not_corrupt(output)

        out, _ = run_to_end(extractions, output)
        assert any(word in out for word in ("resuming", "starting", "nothing to"))
        assert not parts_dir(output).exists()
        assert read_datasets(output) == expected
    assert kills >= KILL_POINTS  # some reruns may finish before their kill lands
    assert inspect_feature_file(output, check=True).status == "complete"
    again, _ = run_to_end(extractions, output)
    assert "nothing to do" in again


def test_pseudo_masks_survive_a_sigkill_bitwise(tmp_path: Path, extractions: Extractions) -> None:
    plan = make_plan(**KILL_PLAN, pseudo_masks=PSEUDO_MASKS)
    reference = extract(tmp_path / "reference.h5", plan)
    assert reference is not None
    output = tmp_path / "killed" / "features.h5"
    output.parent.mkdir()
    pid, lines = extractions.start(output, "--pseudo-masks")
    shards = parts_dir(output) / "vit_h"
    deadline = time.monotonic() + 60
    while len(list(shards.glob("part-*.h5"))) < 3 and time.monotonic() < deadline:
        time.sleep(0.005)  # half of vit_h's 6 shards on disk, the next one open
    kill(pid)
    assert extractions.wait(lines)[1] == -signal.SIGKILL
    with open_for_extraction(output, plan) as writer:
        assert writer.message.startswith("features.h5: resuming")
        write_all(writer)
        assert writer.finish() == output
    expected = read_datasets(reference)
    assert "teachers/vit_h/pseudo_masks" in expected
    assert read_datasets(output) == expected


def test_half_written_temporary_shard_is_discarded(
    tmp_path: Path, extractions: Extractions
) -> None:
    output = tmp_path / "features.h5"
    assert kill_at(extractions, output, 0.3)
    folder = parts_dir(output) / "vit_h"
    if folder.exists():
        (folder / f".part-00002.h5.{os.getpid()}.tmp").write_bytes(b"\x89HDF\r\n" + b"x" * 999)
    run_to_end(extractions, output)
    reference = tmp_path / "reference.h5"
    run_to_end(extractions, reference)
    assert read_datasets(output) == read_datasets(reference)
