"""SIGKILL at random moments, rerun, and the file is bitwise what an uninterrupted run writes."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from samkd.features import inspect_feature_file
from samkd.features.schema import parts_dir

from .feature_helpers import read_datasets

SCRIPT = Path(__file__).with_name("extract_script.py")
SLEEP_PER_BATCH = 0.03


def start(output: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), str(output), "--sleep", str(SLEEP_PER_BATCH)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def run_to_end(output: Path) -> tuple[str, float]:
    """Run the script to completion; its stdout and the seconds after 'ready'."""
    process = start(output)
    assert process.stdout is not None
    first = process.stdout.readline()
    assert first.strip() == "ready"
    began = time.perf_counter()
    rest = process.stdout.read()  # not communicate(): it would skip readline's buffer
    process.wait(timeout=120)
    assert process.stderr is not None
    assert process.returncode == 0, process.stderr.read()
    return first + rest, time.perf_counter() - began


def kill_at(output: Path, seconds: float) -> bool:
    """Start the script, SIGKILL it `seconds` after it is ready; True if it was still running."""
    process = start(output)
    assert process.stdout is not None
    assert process.stdout.readline().strip() == "ready"
    time.sleep(seconds)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    return process.returncode == -signal.SIGKILL


def test_sigkill_at_random_points_then_resume_is_bitwise_identical(tmp_path: Path) -> None:
    reference = tmp_path / "reference" / "features.h5"
    reference.parent.mkdir()
    _, duration = run_to_end(reference)
    expected = read_datasets(reference)

    rng = random.Random(1234)
    kills = 0
    for point in range(4):
        output = tmp_path / f"killed-{point}" / "features.h5"
        output.parent.mkdir()
        kills += kill_at(output, rng.uniform(0.0, duration))
        assert inspect_feature_file(output).status in {"incomplete", "complete"}
        kills += kill_at(output, rng.uniform(0.0, duration / 2))  # the rerun is killed too
        assert inspect_feature_file(output).status in {"incomplete", "complete"}

        out, _ = run_to_end(output)
        assert any(word in out for word in ("resuming", "starting", "nothing to"))
        assert not parts_dir(output).exists()
        assert read_datasets(output) == expected
    assert kills >= 4  # some reruns may finish before their kill lands
    assert inspect_feature_file(output, check=True).status == "complete"
    again, _ = run_to_end(output)
    assert "nothing to do" in again


def test_half_written_temporary_shard_is_discarded(tmp_path: Path) -> None:
    output = tmp_path / "features.h5"
    process = start(output)
    assert process.stdout is not None
    process.stdout.readline()
    time.sleep(0.3)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    folder = parts_dir(output) / "vit_h"
    if folder.exists():
        (folder / f".part-00002.h5.{os.getpid()}.tmp").write_bytes(b"\x89HDF\r\n" + b"x" * 999)
    run_to_end(output)
    reference = tmp_path / "reference.h5"
    run_to_end(reference)
    assert read_datasets(output) == read_datasets(reference)
