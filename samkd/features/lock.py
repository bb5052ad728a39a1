"""One extraction per output: an advisory lock beside it, held by the job from start to join.

The job's rank 0 holds `.<output>.lock` (`fcntl.flock`) from start-up until after the join
and removes it then; a second extraction of the same output stops at once with one line
naming the holder's pid. Whoever takes the lock first deletes the temporary files that
killed writers left (only the holder may: another writer's temporary files are live).
The kernel drops the lock of a killed process, so the next run takes it without help.

Under torchrun, rank 0 writes its job (the rendezvous described in the environment) into
the lock file once the stale files are gone; the other ranks write nothing before the lock
file names their job, so the ranks of a second job on the same output never touch it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from samkd.features.layout import utc_now
from samkd.features.schema import FeatureStoreError, parts_dir
from samkd.files import check_writable, is_temporary, remove_temporaries, wait_until

JOB_VARIABLES = (
    "TORCHELASTIC_RUN_ID",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RESTART_COUNT",
    "WORLD_SIZE",
)


# What flock raises where the file system has no locks (Lustre without -o flock, NFS
# without its lock service).
NO_LOCKS = frozenset({errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP})


class OutputLockedError(FeatureStoreError):
    """Another process holds the output's lock; the message names it, in one line."""


@dataclass
class _Held:
    descriptor: int
    count: int


_held: dict[Path, _Held] = {}


def lock_path(output: Path) -> Path:
    """The lock file of `output`: `.features.h5.lock` beside `features.h5`."""
    return output.with_name(f".{output.name}.lock")


def job_id() -> str:
    """The same string in every process of one torchrun job, another in any other job."""
    return "/".join(os.environ.get(name, "") for name in JOB_VARIABLES)


def holds_lock(output: Path) -> bool:
    """Whether this process holds `output`'s lock."""
    return Path(output).resolve() in _held


@contextmanager
def output_lock(output: Path, job: str = "") -> Iterator[None]:
    """Hold `output`'s lock for the block (re-entrant within a process).

    The first entry checks that the output's folders can be written, takes the lock,
    deletes stale temporary files and then records `job` as ready (see `wait_for_job`).
    Raises OutputLockedError when another process holds it.
    """
    key = Path(output).resolve()
    if key in _held:
        _held[key].count += 1
        try:
            yield
        finally:
            _held[key].count -= 1
        return
    output = Path(output)
    check_writable(output.parent, "extract.output")
    if parts_dir(output).is_dir():
        check_writable(parts_dir(output), "extract.output")
    output.parent.mkdir(parents=True, exist_ok=True)
    path = lock_path(output)
    descriptor = _acquire(path, output)
    _held[key] = _Held(descriptor, 1)
    try:
        _write_holder(descriptor, job, ready=False)
        remove_stale_files(output)
        _write_holder(descriptor, job, ready=True)
        yield
    finally:
        del _held[key]
        # Unlinked before the unlock: a process that opened this file meanwhile finds
        # another file under the name once it gets the lock, and retries (see `_acquire`).
        path.unlink(missing_ok=True)
        os.close(descriptor)


def _acquire(path: Path, output: Path) -> int:
    """A descriptor of the lock file under `path`, locked exclusively by this process."""
    while True:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(descriptor)
            os.close(descriptor)
            raise OutputLockedError(f"{output.name}: {_describe_holder(holder, path)}") from None
        except OSError as error:
            os.close(descriptor)
            if error.errno not in NO_LOCKS:
                raise
            path.unlink(missing_ok=True)  # nobody can hold a lock there
            raise FeatureStoreError(
                f"{output.name}: cannot lock {path} ({os.strerror(error.errno).lower()}): its "
                "file system takes no locks (Lustre needs the flock mount option, NFS its lock "
                "service); set extract.output to a folder on one that does"
            ) from None
        except BaseException:
            os.close(descriptor)
            raise
        if _same_file(descriptor, path):
            return descriptor
        os.close(descriptor)  # the holder removed it between our open and our lock


def _same_file(descriptor: int, path: Path) -> bool:
    try:
        named = path.stat()
    except FileNotFoundError:
        return False
    opened = os.fstat(descriptor)
    return (opened.st_dev, opened.st_ino) == (named.st_dev, named.st_ino)


def _write_holder(descriptor: int, job: str, ready: bool) -> None:
    record = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "since": utc_now(),
        "job": job,
        "ready": ready,
    }
    data = json.dumps(record).encode()
    os.ftruncate(descriptor, 0)
    os.pwrite(descriptor, data, 0)


def _read_holder(descriptor: int, attempts: int = 20) -> dict[str, Any]:
    """The holder's record; empty while the holder has not written it yet (we wait a
    little: it writes right after it takes the lock)."""
    for _ in range(attempts):
        with suppress(OSError, ValueError):
            record = json.loads(os.pread(descriptor, 4096, 0) or b"null")
            if isinstance(record, dict):
                return record
        time.sleep(0.05)
    return {}


def _describe_holder(holder: dict[str, Any], path: Path) -> str:
    who = f"pid {holder['pid']} on {holder.get('host', '?')}" if holder else "unknown pid"
    since = f" since {holder['since']}" if holder.get("since") else ""
    return (
        f"another extraction ({who}{since}) is writing it; wait for it to finish or stop it "
        f"(lock file {path})"
    )


def remove_stale_files(output: Path) -> None:
    """Delete the temporary files of killed writers: the output's (a killed join) and every
    one in its parts folder (shards, decoders, indexes, hash checkpoints, the plan)."""
    remove_temporaries(output)
    parts = parts_dir(output)
    if parts.is_dir():
        for path in parts.rglob(".*"):
            if is_temporary(path) and path.is_file():
                path.unlink(missing_ok=True)


def wait_for_job(output: Path, job: str, poll_seconds: float = 1.0) -> None:
    """Block until this job's rank 0 holds `output`'s lock and has removed the stale
    files, or until the output exists (then there is nothing left to write)."""
    wait_until(lambda: output.exists() or _held_by_job(lock_path(output), job), poll_seconds)


def _held_by_job(path: Path, job: str) -> bool:
    """Whether the lock file names `job` as ready. Read, not probed with a lock of our
    own: that would make rank 0's attempt to take it fail, were they to meet."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        holder = _read_holder(descriptor, attempts=1)
    finally:
        os.close(descriptor)
    return holder.get("job") == job and bool(holder.get("ready"))
