"""Reading an image's row of a tap straight from the disk: one `pread` at its chunk's offset.

A feature file stores each image of a tap as one chunk, uncompressed by default, so a row is
a run of bytes at a known place: in the file itself, or (`extract.join: virtual`) in one of
the shards behind a virtual dataset. `TapRows` learns those places once per file, by walking
HDF5's chunk index once (`chunk_iter`, time linear in the rows: 0.03 to 0.2 s for 10,000 and
about 2 s for 100,000 on a loaded 2-core machine; looking each chunk up by its coordinate
instead costs time that grows with the number of chunks: 0.03 ms a row at 1,000 images, 0.2
to 5 ms at 10,000, over 100 ms at 100,000), and reads a row with one `os.preadv` into the
caller's buffer:

- no copy through HDF5 and no memory map, whose touched pages would count in the resident
  memory of every DataLoader worker for as long as it runs;
- no HDF5 call on the read path, so no HDF5 file lock on shared storage, and a virtual file
  over thousands of shards reads each row from its shard directly (HDF5's own virtual-dataset
  read looks through every mapping for each read);
- a large read goes to the disk as one request rather than page faults of a few pages each.

A row that cannot be read this way (a compressed tap, an unallocated chunk, an HDF5 without
`chunk_iter`) reads through h5py instead (`read_into` returns False).
"""

from __future__ import annotations

import bisect
import os
import resource
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from samkd.features.layout import open_read_only

NOT_DIRECT = -1  # the offset of a row that cannot be read directly


@dataclass(frozen=True)
class RowSource:
    """Rows `first` to `first + count - 1` of a tap are the rows of dataset `name` of `path`."""

    path: str
    name: str
    first: int
    count: int


def tap_sources(path: Path, dataset: h5py.Dataset) -> list[RowSource]:
    """Where the rows of a tap of the feature file `path` are, in row order: the file itself,
    or for a virtual dataset the shards behind it (paths relative to the file's folder)."""
    if not dataset.is_virtual:
        return [RowSource(str(path), dataset.name, 0, int(dataset.shape[0]))]
    sources = []
    for mapping in dataset.virtual_sources():
        (start, stop), *_ = [block[:, 0] for block in mapping.vspace.get_select_hyper_blocklist()]
        sources.append(
            RowSource(
                str(Path(path).parent / mapping.file_name),
                mapping.dset_name,
                int(start),
                int(stop) - int(start) + 1,
            )
        )
    return sorted(sources, key=lambda source: source.first)


def chunk_offsets(dataset: h5py.Dataset) -> np.ndarray | None:
    """The byte offset of each row's chunk (`NOT_DIRECT` where a row's bytes are not its
    chunk's), or None when no row of `dataset` can be read directly."""
    row_bytes = int(np.prod(dataset.shape[1:], dtype=np.int64)) * dataset.dtype.itemsize
    chunks = dataset.chunks
    if (
        chunks is None
        or tuple(chunks) != (1, *dataset.shape[1:])
        or dataset._filters  # compression, shuffle, checksums: the bytes are not the row
        or not hasattr(dataset.id, "chunk_iter")
    ):
        return None
    offsets = np.full(dataset.shape[0], NOT_DIRECT, dtype=np.int64)

    def visit(chunk: Any) -> None:
        if chunk.size == row_bytes and chunk.filter_mask == 0 and chunk.byte_offset is not None:
            offsets[chunk.chunk_offset[0]] = chunk.byte_offset

    dataset.id.chunk_iter(visit)
    return offsets


def open_files_allowed() -> int:
    """Descriptors a process may keep open for rows: a quarter of its limit (`ulimit -n`),
    the rest left to HDF5, DataLoader workers' shared memory and sockets. A virtual file of
    110,000 images in shards of 64 has 1,719 shards: with a limit of 1,024, reads reopen
    shards (raise the limit, use a larger `extract.shard_size`, or the copy join)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(16, (soft if soft != resource.RLIM_INFINITY else 1 << 16) // 4)


class Descriptors:
    """One process's open files, by path, at most `max_open` (default `open_files_allowed`;
    the least recently used is closed first). A copy (pickled to a DataLoader worker) opens
    its own; descriptors inherited over fork stay valid (a pread needs no file position)."""

    def __init__(self, max_open: int | None = None):
        self.max_open = open_files_allowed() if max_open is None else max_open
        self._open: OrderedDict[str, int] = OrderedDict()

    def __call__(self, path: str) -> int:
        descriptor = self._open.get(path)
        if descriptor is not None:
            self._open.move_to_end(path)
            return descriptor
        if len(self._open) >= self.max_open:
            _, oldest = self._open.popitem(last=False)
            os.close(oldest)
        descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        self._open[path] = descriptor
        return descriptor

    def close(self) -> None:
        for descriptor in self._open.values():
            os.close(descriptor)
        self._open.clear()

    def __getstate__(self) -> dict[str, Any]:
        return {"max_open": self.max_open, "_open": OrderedDict()}


class TapRows:
    """Where each row of one tap is and how to read it: made from the open dataset, which
    gives the offsets of the rows in the file itself at once; those in shards are learned on
    first use of each shard."""

    def __init__(self, path: Path, dataset: h5py.Dataset):
        self.sources = tap_sources(path, dataset)
        self.starts = [source.first for source in self.sources]
        self.row_bytes = int(np.prod(dataset.shape[1:], dtype=np.int64)) * dataset.dtype.itemsize
        self.offsets: list[np.ndarray | None] = [None] * len(self.sources)
        self.learned = [False] * len(self.sources)
        if not dataset.is_virtual:
            self.offsets[0], self.learned[0] = chunk_offsets(dataset), True

    def locate(self, row: int) -> tuple[str, int] | None:
        """(file, byte offset) of `row`, or None when it cannot be read directly."""
        index = bisect.bisect_right(self.starts, row) - 1
        source = self.sources[index]
        if not self.learned[index]:
            with open_read_only(Path(source.path)) as handle:
                self.offsets[index] = chunk_offsets(handle[source.name])
            self.learned[index] = True
        offsets = self.offsets[index]
        if offsets is None or offsets[row - source.first] == NOT_DIRECT:
            return None
        return source.path, int(offsets[row - source.first])

    def read_into(self, row: int, out: np.ndarray, descriptors: Descriptors) -> bool:
        """Fill `out` (C-contiguous, the row's dtype and shape) with `row`; False when it
        cannot be read directly."""
        place = self.locate(row)
        if place is None:
            return False
        path, offset = place
        view = memoryview(out.data).cast("B")
        descriptor, filled = descriptors(path), 0
        while filled < len(view):
            count = os.preadv(descriptor, [view[filled:]], offset + filled)
            if count == 0:
                return False  # the file ends before the row: let HDF5 say what is wrong
            filled += count
        return True

    def advise(self, rows: Sequence[int], descriptors: Descriptors) -> None:
        """Ask the disk for `rows` now (`POSIX_FADV_WILLNEED`), to be read soon: the reads
        of a batch are then in flight together rather than one after the other."""
        for row in rows:
            place = self.locate(row)
            if place is not None:
                path, offset = place
                os.posix_fadvise(descriptors(path), offset, self.row_bytes, os.POSIX_FADV_WILLNEED)
