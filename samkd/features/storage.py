"""The disk under an extraction: writability, free space, and one-line errors when it fails.

HDF5 reports a full or read-only file system as an `OSError` (or a `RuntimeError` from a
flush) with a multi-line message; `storage_errors` turns those, wherever extraction meets
them, into a `StorageError` that names the file and the free space in one line.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from samkd.features.schema import FeatureStoreError
from samkd.files import existing_folder, format_bytes

FULL = frozenset({errno.ENOSPC, errno.EDQUOT})
NOT_WRITABLE = frozenset({errno.EROFS, errno.EACCES, errno.EPERM})
# HDF5 puts the C errno and the file inside its message, not in OSError's fields.
_HDF5_ERRNO = re.compile(r"errno = (\d+)")
_HDF5_FILE = re.compile(r"filename = '([^']*)'")


class StorageError(FeatureStoreError):
    """The output's file system is full or cannot be written; the message is one line."""


def free_bytes(folder: Path) -> int:
    """Bytes that an unprivileged writer may still use on `folder`'s file system."""
    return shutil.disk_usage(folder).free


def storage_errno(error: BaseException, output: Path) -> tuple[int, str | None] | None:
    """(errno, file) of a full or read-only file system behind `error` or its causes.

    A permission error counts only for a file beside `output`: one on an image file is
    the dataset's problem, not the output's.
    """
    seen: BaseException | None = error
    visited: set[int] = set()
    while seen is not None and id(seen) not in visited:
        visited.add(id(seen))
        code = getattr(seen, "errno", None) if isinstance(seen, OSError) else None
        if code is None:
            match = _HDF5_ERRNO.search(str(seen))
            code = int(match.group(1)) if match else None
        if code in FULL | NOT_WRITABLE:
            name = _failed_file(seen)
            if code in FULL or code == errno.EROFS or _beside(name, output):
                return code, name
        seen = seen.__cause__ or (None if seen.__suppress_context__ else seen.__context__)
    return None


def _failed_file(error: BaseException) -> str | None:
    name = getattr(error, "filename", None) if isinstance(error, OSError) else None
    if name is None:
        match = _HDF5_FILE.search(str(error))
        name = match.group(1) if match else None
    return None if name is None else str(name)


def _beside(name: str | None, output: Path) -> bool:
    """Whether file `name` (None: unknown) is in `output`'s folder or its parts folder."""
    if name is None:
        return True
    folder = Path(output).resolve().parent
    return Path(name).resolve().is_relative_to(folder)


def describe_storage_failure(output: Path, code: int, path: str | None) -> str:
    """One line: the output, why writing `path` (None: unknown) failed, the space left."""
    where = f" writing {path}" if path else ""
    if code in FULL:
        folder = existing_folder(Path(output).parent)
        return (
            f"{output.name}: no space left on {folder} ({format_bytes(free_bytes(folder))} "
            f"free){where}; free some space or set extract.output to another disk, then rerun"
        )
    return (
        f"{output.name}: cannot write {path or Path(output).parent} "
        f"({os.strerror(code).lower()}); set extract.output to a writable folder"
    )


@contextmanager
def storage_errors(output: Path) -> Iterator[None]:
    """Raise a full or read-only file system met in the block as a one-line StorageError."""
    try:
        yield
    except Exception as error:
        if type(error).__module__.startswith("samkd."):
            raise  # already one line
        found = storage_errno(error, Path(output))
        if found is None:
            raise
        raise StorageError(describe_storage_failure(Path(output), *found)) from error
