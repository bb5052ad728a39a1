"""Writing files so that a crash never leaves a partial one under the final name, and waiting
for files that other processes publish."""

from __future__ import annotations

import glob
import json
import os
import re
import secrets
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

TEMPORARY_SUFFIX = ".tmp"


def temporary_path(path: Path, suffix: str = TEMPORARY_SUFFIX) -> Path:
    """A hidden name beside `path`, unique per call, to write to before `publish`."""
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}{suffix}")


def is_temporary(path: Path) -> bool:
    return path.name.startswith(".") and path.name.endswith(TEMPORARY_SUFFIX)


def remove_temporaries(path: Path) -> None:
    """Delete the temporaries of `path` (`temporary_path`, or `.NAME.PID.tmp` of earlier
    versions) that killed writers left behind; only for a caller that is the one writer of
    `path` (a concurrent writer would lose its file)."""
    name = re.compile(rf"\.{re.escape(path.name)}\.\d+(-[0-9a-f]+)?{re.escape(TEMPORARY_SUFFIX)}")
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*"):
        if name.fullmatch(stale.name):
            stale.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    """Flush a file's bytes, or a folder's entries (a rename), to the disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def publish(temporary: Path, final: Path, exclusive: bool = False) -> bool:
    """Give a complete, closed file its final name: fsync, rename, fsync the folder, so that
    after a crash (power loss included) `final` is either absent, the old file, or complete.

    `exclusive`: keep an existing `final` (another process published first), return False.
    """
    _fsync(temporary)
    if exclusive:
        try:
            os.link(temporary, final)
        except FileExistsError:
            return False
        finally:
            temporary.unlink()
    else:
        os.replace(temporary, final)
    _fsync(final.parent)
    return True


@contextmanager
def atomic_path(
    path: Path, suffix: str = TEMPORARY_SUFFIX, exclusive: bool = False
) -> Iterator[Path]:
    """A temporary path beside `path` to write to: published to `path` (see `publish`) when
    the block succeeds, removed when it fails. `suffix` keeps writers that infer the format
    from it working."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_path(path, suffix)
    try:
        yield temporary
        publish(temporary, path, exclusive)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_json(data: Any, path: Path) -> None:
    """Write `data` as indented JSON under a temporary name, then rename it into place."""
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(data, indent=2) + "\n")


def wait_until(ready: Callable[[], bool], poll_seconds: float = 5.0) -> None:
    """Block until `ready()`: how processes that must not wait in a collective (its timeout
    would end a long wait) wait for the files that another process publishes."""
    while not ready():
        time.sleep(poll_seconds)


def wait_for_paths(
    paths: Iterable[Path], poll_seconds: float = 5.0, on_found: Callable[[int], None] | None = None
) -> None:
    """Block until every path exists; `on_found(n)` when a poll finds `n` more. Each poll
    looks only for the paths still missing."""
    missing = list(paths)
    while True:
        still = [path for path in missing if not path.exists()]
        if on_found is not None and len(still) < len(missing):
            on_found(len(missing) - len(still))
        if not still:
            return
        missing = still
        time.sleep(poll_seconds)


def existing_folder(path: Path) -> Path:
    """`path` or its nearest existing ancestor, for asking about its file system."""
    path = path.resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(folder: Path, what: str) -> None:
    """Raise `OutputNotWritable` unless files can be created in `folder`, or in the folder it
    would be made in: checked before long work by creating one (`os.access` says yes to root
    on a read-only file system), leaving nothing behind. `what` names the setting or option."""
    existing = existing_folder(folder)
    if not existing.is_dir():
        raise OutputNotWritable(f"{what} {folder}: {existing} is a file, not a folder")
    probe = temporary_path(existing / "write-check")
    try:
        probe.touch()
        probe.unlink()
    except OSError as error:
        raise OutputNotWritable(f"{what} {folder} is not writable: {error.strerror}") from None


class OutputNotWritable(OSError):
    """An output folder cannot be written to; the message is one line naming it."""


def format_bytes(size: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")
