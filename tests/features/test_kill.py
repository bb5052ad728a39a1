"""SIGKILL at random moments, rerun, and the file is bitwise what an uninterrupted run writes."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from samkd.features import inspect_feature_file, open_for_extraction
from samkd.features.schema import parts_dir

from .feature_helpers import KILL_PLAN, PSEUDO_MASKS, extract, make_plan, read_datasets, write_all

SCRIPT = Path(__file__).with_name("extract_script.py")
SLEEP_PER_BATCH = 0.03


def start(output: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), str(output), "--sleep", str(SLEEP_PER_BATCH), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def run_to_end(output: Path, *extra: str) -> tuple[str, float]:
    """Run the script to completion; its stdout and the seconds after 'ready'."""
    process = start(output, *extra)
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
    for point in range(2):
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
    assert kills >= 2  # some reruns may finish before their kill lands
    assert inspect_feature_file(output, check=True).status == "complete"
    again, _ = run_to_end(output)
    assert "nothing to do" in again


def test_pseudo_masks_survive_a_sigkill_bitwise(tmp_path: Path) -> None:
    plan = make_plan(**KILL_PLAN, pseudo_masks=PSEUDO_MASKS)
    reference = extract(tmp_path / "reference.h5", plan)
    assert reference is not None
    output = tmp_path / "killed" / "features.h5"
    output.parent.mkdir()
    process = start(output, "--pseudo-masks")
    shards = parts_dir(output) / "vit_h"
    deadline = time.monotonic() + 60
    while len(list(shards.glob("part-*.h5"))) < 3 and time.monotonic() < deadline:
        time.sleep(0.005)  # half of vit_h's 6 shards on disk, the next one open
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=30) == -signal.SIGKILL
    with open_for_extraction(output, plan) as writer:
        assert writer.message.startswith("features.h5: resuming")
        write_all(writer)
        assert writer.finish() == output
    expected = read_datasets(reference)
    assert "teachers/vit_h/pseudo_masks" in expected
    assert read_datasets(output) == expected


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
