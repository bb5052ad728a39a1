"""Image identity: the sha256 of every image file, hashed once and then trusted by file stat.

A feature file records each image's id, size in pixels and the sha256 of its file bytes
(`ImageRecord`), so that a resumed extraction cannot mix two versions of an image and a
training run can tell that the features belong to its images. At SA-1B scale (11M files,
about 11 TB) hashing means hours of reading, so it is done once, and every record also keeps
the file's (size, mtime_ns) when it was hashed:

- Rank 0 indexes the images (`index_images`) on a thread pool (file reads and hashlib
  release the GIL) and hashes only the files whose stat differs from a known record
  (`known_images`: the finished output's, else the parts folder's `index.h5` and the
  checkpoints that an indexing killed midway left, one per `CHECKPOINT_FILES` hashed).
- The other ranks wait for rank 0's index on disk (polling files: no collective, whose
  timeout a long wait would hit) and check only the files of their own shards.
- Training checks every file (`changed_image` with `max_hashed`): a different size is a
  change; a file with the same size and a new mtime is hashed, but at most `max_hashed` of
  them (spread evenly) are, since a copied dataset has new mtimes everywhere.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from secrets import token_hex
from typing import TypeVar

from samkd.features.layout import read_index_file, write_index_file
from samkd.features.schema import ImageRecord, file_sha256, parts_dir
from samkd.files import wait_until

CHECKPOINT_FILES = 50_000  # files hashed between two checkpoints: about 50 GB of SA-1B
MAX_HASHED = 1000  # files a training check hashes at most: about 1 GB of SA-1B
PROGRESS_BYTES = 1 << 30  # show progress when hashing reads more than this
BLOCK = 64  # items per thread-pool task: 11M files must not make 11M futures

Advance = Callable[[int], None]
# `progress(description, total)` opens a progress display, yields its `advance(count)`.
Progress = Callable[[str, int], AbstractContextManager[Advance]]
Item = TypeVar("Item")
Result = TypeVar("Result")


def parallel_map(
    function: Callable[[Item], Result], items: Sequence[Item], advance: Advance | None = None
) -> list[Result]:
    """`[function(item) for item in items]` on a thread pool, in order."""

    def run(block: Sequence[Item]) -> list[Result]:
        results = [function(item) for item in block]
        if advance is not None:
            advance(len(block))
        return results

    blocks = [items[start : start + BLOCK] for start in range(0, len(items), BLOCK)]
    with ThreadPoolExecutor() as pool:
        return [result for block in pool.map(run, blocks) for result in block]


def file_stat(path: Path) -> tuple[int, int] | None:
    """(size, mtime_ns) of a file, None when it is missing."""
    try:
        info = path.stat()
    except FileNotFoundError:
        return None
    return info.st_size, info.st_mtime_ns


def describe_image_file(path: Path, image_id: str | None = None) -> ImageRecord:
    """An index record for an image file: id (default: file name), size in pixels, sha256 of
    its bytes and the file's stat (taken first: a file written meanwhile looks changed).

    Raises `samkd.data.DataError` when the file cannot be read as an image."""
    from samkd.data.images import read_image_size

    info = path.stat()
    height, width = read_image_size(path)
    sha256 = file_sha256(path)
    return ImageRecord(image_id or path.name, height, width, sha256, info.st_size, info.st_mtime_ns)


def checkpoint_paths(output: Path) -> list[Path]:
    """The hash checkpoints of an indexing that did not reach `index.h5`."""
    return sorted(parts_dir(output).glob("image-hashes-*.h5"))


def known_images(output: Path) -> dict[str, ImageRecord]:
    """Records hashed by earlier runs, by id: the finished output's, else those of the parts
    folder (`index.h5` and the checkpoints). Unreadable sources are skipped (hashed again)."""
    if output.exists():
        sources = [output]
    else:
        sources = [parts_dir(output) / "index.h5", *checkpoint_paths(output)]
    known: dict[str, ImageRecord] = {}
    for source in sources:
        try:
            records = read_index_file(source)
        except (OSError, KeyError):
            continue
        known.update((record.id, record) for record in records if record.file_size >= 0)
    return known


def index_images(
    paths: Sequence[Path],
    ids: Sequence[str],
    known: Mapping[str, ImageRecord],
    checkpoints: Path | None = None,
    progress: Progress | None = None,
    describe: Callable[[Path, str], ImageRecord] | None = None,
) -> tuple[ImageRecord, ...]:
    """The records of the image files, in order: a known record whose file has the same
    (size, mtime_ns) is reused, the other files are hashed; `checkpoints` (a folder) keeps
    what was hashed every `CHECKPOINT_FILES` files, for a rerun after a kill. `describe`
    (default `describe_image_file`) makes the record of one file."""
    make_record = describe or describe_image_file
    stats = parallel_map(file_stat, paths)
    records: list[ImageRecord | None] = []
    for image_id, stat in zip(ids, stats, strict=True):
        record = known.get(image_id)
        unchanged = record is not None and (record.file_size, record.mtime_ns) == stat
        records.append(record if unchanged else None)
    todo = [index for index, record in enumerate(records) if record is None]
    size = sum(stat[0] for stat in (stats[i] for i in todo) if stat is not None)
    with _hashing(progress, "hashing images", len(todo), size) as advance:
        for start in range(0, len(todo), CHECKPOINT_FILES):
            chunk = todo[start : start + CHECKPOINT_FILES]
            hashed = parallel_map(lambda i: make_record(paths[i], ids[i]), chunk, advance)
            for index, record in zip(chunk, hashed, strict=True):
                records[index] = record
            if checkpoints is not None and start + len(chunk) < len(todo):
                _write_checkpoint(checkpoints, hashed)
    return tuple(record for record in records if record is not None)


def _write_checkpoint(folder: Path, records: Sequence[ImageRecord]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    write_index_file(folder / f"image-hashes-{token_hex(8)}.h5", records, {})


def _hashing(
    progress: Progress | None, description: str, count: int, total_bytes: int
) -> AbstractContextManager[Advance | None]:
    """A progress display for hashing `count` files, when they are big enough to take a
    while; else nothing."""
    if progress is None or total_bytes < PROGRESS_BYTES:
        return nullcontext()
    return progress(description, count)


def wait_for_index(output: Path, poll_seconds: float = 5.0) -> tuple[ImageRecord, ...]:
    """The records that rank 0 publishes: the finished output's, else those of the parts
    folder's `index.h5`, waited for (rank 0 may be hashing for hours)."""
    plan_file, index_file = parts_dir(output) / "plan.json", parts_dir(output) / "index.h5"
    wait_until(
        lambda: output.exists() or (plan_file.exists() and index_file.exists()), poll_seconds
    )
    return read_index_file(output if output.exists() else index_file)


def first_id_difference(stored: Sequence[ImageRecord], ids: Sequence[str]) -> str | None:
    """Which image id differs first, e.g. "image 3 was 'a.jpg', now 'b.jpg'"."""
    for index, (record, image_id) in enumerate(zip(stored, ids, strict=False)):
        if record.id != image_id:
            return f"image {index} was '{record.id}', now '{image_id}'"
    if len(stored) != len(ids):
        return f"was extracted for {len(stored)} images, now {len(ids)}"
    return None


def changed_image(
    stored: Sequence[ImageRecord],
    paths: Sequence[Path],
    indices: Iterable[int] | None = None,
    max_hashed: int | None = None,
    progress: Progress | None = None,
) -> str | None:
    """The first image (of `indices`, default all) whose file is not the one `stored`
    describes, as a phrase naming its id and file; None when all match.

    A file with the stored size and mtime matches; another size is a change; a file with
    the same size and another mtime (or no stored stat) is hashed: all of them, or at most
    `max_hashed`, spread evenly over them.
    """
    indices = range(len(stored)) if indices is None else list(indices)
    stats = parallel_map(lambda i: file_stat(paths[i]), indices)
    suspects = []
    for index, stat in zip(indices, stats, strict=True):
        record = stored[index]
        where = f"image '{record.id}' ({paths[index]})"
        if stat is None:
            return f"{where} is missing"
        if record.file_size >= 0 and stat[0] != record.file_size:
            return f"{where} has changed since extraction ({record.file_size} bytes, now {stat[0]})"
        if stat[1] != record.mtime_ns or record.file_size < 0:
            suspects.append(index)
    if max_hashed is not None and len(suspects) > max_hashed:
        suspects = [suspects[k * len(suspects) // max_hashed] for k in range(max_hashed)]
    size = sum(stored[index].file_size for index in suspects)
    with _hashing(progress, "checking images", len(suspects), size) as advance:
        hashes = parallel_map(lambda i: file_sha256(paths[i]), suspects, advance)
    for index, sha256 in zip(suspects, hashes, strict=True):
        record = stored[index]
        if sha256 != record.sha256:
            return (
                f"image '{record.id}' ({paths[index]}) has changed since extraction "
                f"(sha256 {record.sha256[:12]}..., now {sha256[:12]}...)"
            )
    return None
