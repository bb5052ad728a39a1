"""One writer per output: the lock, its holder's pid in the refusal, stale locks, and two
`samkd extract` started on one output."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

import samkd.features.lock
from samkd.features import FeatureStoreError, open_for_extraction
from samkd.features.lock import (
    OutputLockedError,
    holds_lock,
    lock_path,
    output_lock,
    wait_for_job,
)

from .fault_helpers import ONE_THREAD, extract_process, run_extract_process
from .feature_helpers import make_plan, read_datasets, write_all

# Takes the lock of argv[1] with job argv[2], says "locked", then sleeps until killed.
HOLD_LOCK = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from samkd.features.lock import output_lock
    with output_lock(Path(sys.argv[1]), sys.argv[2]):
        print("locked", flush=True)
        time.sleep(600)
    """
)


def hold_lock(output: Path, job: str = "other") -> subprocess.Popen[str]:
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(output), job], stdout=subprocess.PIPE, text=True
    )
    assert process.stdout is not None
    assert process.stdout.readline().strip() == "locked"
    return process


def test_a_second_writer_is_refused_with_the_holders_pid(tmp_path: Path) -> None:
    output = tmp_path / "f.h5"
    holder = hold_lock(output)
    try:
        with pytest.raises(OutputLockedError) as error:
            open_for_extraction(output, make_plan())
        text = str(error.value)
        assert "\n" not in text
        assert text.startswith(f"f.h5: another extraction (pid {holder.pid} on ")
        assert text.endswith(
            f"is writing it; wait for it to finish or stop it (lock file {lock_path(output)})"
        )
        assert not holds_lock(output)
    finally:
        holder.kill()
        holder.wait()
    # The kernel released the killed holder's lock; its file stays, and is taken over.
    assert lock_path(output).exists()
    with open_for_extraction(output, make_plan()) as writer:
        assert holds_lock(output)
        record = json.loads(lock_path(output).read_text())
        assert record["pid"] == os.getpid() and record["ready"] is True
        write_all(writer)
        assert writer.finish() == output
    assert not holds_lock(output)
    assert not lock_path(output).exists()


def test_the_lock_is_reentrant_within_a_process(tmp_path: Path) -> None:
    output = tmp_path / "f.h5"
    with output_lock(output, "job"):
        with open_for_extraction(output, make_plan(num_images=2)) as writer:
            writer.close()
        assert holds_lock(output) and lock_path(output).exists()
    assert not holds_lock(output) and not lock_path(output).exists()


def test_a_file_system_without_locks_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_locks(descriptor: int, operation: int) -> None:
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))

    monkeypatch.setattr(samkd.features.lock.fcntl, "flock", no_locks)
    output = tmp_path / "features.h5"
    with pytest.raises(FeatureStoreError) as error, output_lock(output):
        pass
    message = str(error.value)
    assert "\n" not in message and not isinstance(error.value, OutputLockedError)
    assert message.startswith(f"features.h5: cannot lock {lock_path(output)} (function not ")
    assert "set extract.output to a folder" in message
    assert not holds_lock(output) and not lock_path(output).exists()


def test_other_ranks_wait_for_their_jobs_rank_0(tmp_path: Path) -> None:
    output = tmp_path / "f.h5"
    returned = threading.Event()

    def rank_1() -> None:
        wait_for_job(output, "mine", poll_seconds=0.01)
        returned.set()

    waiter = threading.Thread(target=rank_1, daemon=True)
    waiter.start()
    other = hold_lock(output, job="theirs")  # another job's rank 0
    try:
        assert not returned.wait(0.5)
    finally:
        other.kill()
        other.wait()
    mine = hold_lock(output, job="mine")
    try:
        assert returned.wait(10)
    finally:
        mine.kill()
        mine.wait()


def test_two_extractions_of_one_output(tmp_path: Path, shapes: Path, reference: Path) -> None:
    """The first holds the lock while it joins; the second stops at once without touching
    the first's files, and the first finishes the file as an undisturbed run does."""
    output, release = tmp_path / "f.h5", tmp_path / "release-join"
    command = extract_process(shapes, output, patches=("--hold-join", str(release)))
    first = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ONE_THREAD
    )
    try:
        joining = wait_for_join(output, first)
        second = run_extract_process(shapes, output)
        assert second.returncode == 1
        assert "Traceback" not in second.stderr
        assert (
            second.stderr.strip()
            .splitlines()[-1]
            .startswith(f"error: f.h5: another extraction (pid {first.pid} on ")
        )
        assert joining.exists()  # the first's live temporary file was left alone
        release.touch()
        _, stderr = first.communicate(timeout=300)
    finally:
        release.touch()
        if first.poll() is None:
            first.send_signal(signal.SIGKILL)
            first.wait()
    assert first.returncode == 0, stderr[-3000:]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["f.h5", "release-join"]
    assert read_datasets(output) == read_datasets(reference)


def wait_for_join(output: Path, process: subprocess.Popen[str]) -> Path:
    """The temporary file of the join that `process` holds open (see `--hold-join`)."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        found = list(output.parent.glob(f".{output.name}.*.tmp"))
        if found:
            return found[0]
        time.sleep(0.05)
    raise AssertionError(f"no join began (exit status {process.poll()})")
