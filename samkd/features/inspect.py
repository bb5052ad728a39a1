"""What is in a feature file, how big it is, and whether it is complete and intact.

Works on a finished file (copied or virtual) and on an extraction still running or stopped
(pass the output path or its `.parts` folder: completed shards are read, in-progress ones are
only counted). `status` is `complete`, `incomplete` or `corrupt`; `exit_code` maps them to
0 / 1 / 2 for the command line.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import h5py
import numpy as np

from samkd.features.join import read_parts_plan, shard_count
from samkd.features.layout import (
    PSEUDO_MASK_COUNTS,
    PSEUDO_MASKS,
    PSEUDO_MASKS_CRC32,
    open_read_only,
    read_index_file,
    read_skipped,
    read_skipped_images,
)
from samkd.features.pseudo_masks import decode_rows
from samkd.features.reader import file_teachers, missing_virtual_sources, open_feature_file
from samkd.features.schema import (
    FeatureStoreError,
    TeacherSpec,
    decoder_path,
    parts_dir,
    shard_path,
)
from samkd.files import format_bytes, is_temporary

Status = Literal["complete", "incomplete", "corrupt"]
RowReader = Callable[[int], tuple[np.ndarray, int]]
# One image's stored pseudo-masks: (JSON bytes, stored crc32, stored count).
MaskRowReader = Callable[[int], tuple[bytes, int, int]]


@dataclass
class TapReport:
    """One tap of one teacher: layout, size on disk and value statistics."""

    teacher: str
    name: str
    kind: str
    shape: list[int]
    dtype: str
    chunks: list[int] | None
    compression: str
    bytes_on_disk: int
    bytes_per_image: float
    images_sampled: int = 0
    mean: float | None = None
    std: float | None = None
    min: float | None = None
    max: float | None = None
    nan_count: int = 0
    inf_count: int = 0
    checksum_errors: int = 0


@dataclass
class SkippedImage:
    """An image that extraction could not read (`data.on_error=skip`); its rows are zeros."""

    index: int
    id: str
    reason: str


@dataclass
class PseudoMaskReport:
    """The pseudo-masks of one teacher, counted over the finished images not skipped.

    `min`, `mean` and `max` are masks per image; `checksum_errors` (with `check`) counts
    the rows that fail their crc32 or whose masks are not as many as their stored count.
    """

    teacher: str
    options: dict[str, Any]
    images: int = 0
    images_with_masks: int = 0
    images_without_masks: int = 0
    total: int = 0
    min: int | None = None
    mean: float | None = None
    max: int | None = None
    checksum_errors: int = 0


@dataclass
class TeacherReport:
    name: str
    model_type: str
    image_size: int
    checkpoint_name: str | None
    checkpoint_sha256: str | None
    images_done: int
    images_total: int
    decoder_tensors: int
    taps: list[TapReport] = field(default_factory=list)
    frame: str = "longest_side"


@dataclass
class FeatureFileReport:
    """What `inspect_feature_file` found: `to_json()` for machines, `render_report` for people."""

    path: str
    source: Literal["file", "parts"]
    status: Status
    problems: list[str] = field(default_factory=list)
    checked: bool = False
    schema_version: int | None = None
    samkd_version: str | None = None
    created: str | None = None
    layout: str | None = None
    dtype: str | None = None
    compression: str | None = None
    compute: dict[str, str] = field(default_factory=dict)
    num_images: int = 0
    bytes_on_disk: int = 0
    bytes_per_image: float = 0.0
    teachers: list[TeacherReport] = field(default_factory=list)
    skipped_images: list[SkippedImage] = field(default_factory=list)
    pseudo_masks: PseudoMaskReport | None = None

    @property
    def exit_code(self) -> int:
        return {"complete": 0, "incomplete": 1, "corrupt": 2}[self.status]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)


def inspect_feature_file(path: Path, sample: int = 8, check: bool = False) -> FeatureFileReport:
    """Report on a feature file (or a running extraction's parts folder).

    Statistics are over `sample` evenly spaced finished images; `check=True` reads every
    image, verifies each sample's crc32 and counts non-finite values in all of them.
    """
    path = Path(path)
    if path.name.endswith(".parts") and path.is_dir():
        path = path.with_name(path.name.removesuffix(".parts"))
    if not path.exists() and parts_dir(path).is_dir():
        return _inspect_parts(path, sample, check)
    try:
        return _inspect_file(path, sample, check)
    except FeatureStoreError as error:
        return FeatureFileReport(str(path), "file", "corrupt", [str(error)], check)
    except (OSError, KeyError, ValueError, RuntimeError) as error:
        problem = f"{path.name}: unreadable ({type(error).__name__}: {error})"
        return FeatureFileReport(str(path), "file", "corrupt", [problem], check)


# --------------------------------------------------------------------------- finished file


def _inspect_file(path: Path, sample: int, check: bool) -> FeatureFileReport:
    with open_feature_file(path) as handle:
        plan = json.loads(handle.attrs["plan"])
        report = _report_header(path, "file", plan, check)
        report.schema_version = int(handle.attrs["schema_version"])
        report.samkd_version = str(handle.attrs["samkd_version"])
        report.layout = str(handle.attrs["layout"])
        report.bytes_on_disk = path.stat().st_size
        if report.layout == "virtual":
            report.bytes_on_disk += _folder_bytes(parts_dir(path))
        skipped = read_skipped_images(handle["images"])
        ids = handle["images/ids"].asstr()
        report.skipped_images = [
            SkippedImage(index, str(ids[index]), reason) for index, reason in skipped.items()
        ]
        for teacher in file_teachers(handle):
            group = handle["teachers"][teacher.name]
            done = group["done"][()]
            teacher_report = _teacher_report(teacher, int(done.sum()), done.size)
            teacher_report.decoder_tensors = len(group["decoder"]) if "decoder" in group else 0
            for tap in teacher.taps:
                dataset = group["taps"][tap.name]
                missing = missing_virtual_sources(path, dataset)
                if missing:
                    report.problems.append(f"teacher '{teacher.name}' shard {missing[0]} missing")
                    continue
                checksums = group["crc32"][tap.name][()]

                def read(row: int, dataset: h5py.Dataset = dataset, crc: Any = checksums) -> Any:
                    return dataset[row], int(crc[row])

                tap_report = _tap_layout(teacher.name, tap.name, dataset, plan)
                tap_report.bytes_on_disk = _dataset_bytes(path, dataset)
                tap_report.bytes_per_image = tap_report.bytes_on_disk / max(done.size, 1)
                rows = _rows_with_features(done, skipped)
                _add_statistics(tap_report, read, rows, sample, check)
                teacher_report.taps.append(tap_report)
            report.teachers.append(teacher_report)
        options = plan.get("pseudo_masks")
        if options is not None:
            group = handle["teachers"][options["teacher"]]
            counts = group[PSEUDO_MASK_COUNTS][()]
            crc, texts = group[PSEUDO_MASKS_CRC32][()], group[PSEUDO_MASKS]

            def read_masks(row: int) -> tuple[bytes, int, int]:
                return bytes(texts[row]), int(crc[row]), int(counts[row])

            rows = _rows_with_features(group["done"][()], skipped)
            report.pseudo_masks = _pseudo_mask_report(
                options, counts, rows, read_masks if check else None
            )
    return _finish(report, plan)


def _pseudo_mask_report(
    options: dict[str, Any], counts: np.ndarray, rows: np.ndarray, read: MaskRowReader | None
) -> PseudoMaskReport:
    """The counts of pseudo-masks (`counts`: per image) over `rows`; `read` verifies each."""
    report = PseudoMaskReport(
        teacher=str(options["teacher"]),
        options={key: value for key, value in options.items() if key != "teacher"},
        images=int(rows.size),
    )
    per_image = counts[rows]
    if per_image.size:
        report.images_with_masks = int((per_image > 0).sum())
        report.images_without_masks = int((per_image == 0).sum())
        report.total = int(per_image.sum())
        report.min, report.max = int(per_image.min()), int(per_image.max())
        report.mean = report.total / per_image.size
    if read is not None:
        for row in rows:
            data, crc, count = read(int(row))
            if zlib.crc32(data) != crc or _mask_count(data) != count:
                report.checksum_errors += 1
    return report


def _mask_count(data: bytes) -> int:
    """How many masks a stored row holds (-1: it is not a row of masks)."""
    try:
        return len(decode_rows([data])[0])
    except ValueError:
        return -1


def _rows_with_features(done: np.ndarray, skipped: dict[int, str]) -> np.ndarray:
    """The finished images, less those skipped (their zeros are no teacher's output)."""
    rows = np.flatnonzero(done)
    return rows[~np.isin(rows, list(skipped))] if skipped else rows


def _dataset_bytes(path: Path, dataset: h5py.Dataset) -> int:
    if not dataset.is_virtual:
        return int(dataset.id.get_storage_size())
    total = 0
    for source in dataset.virtual_sources():
        with open_read_only(path.parent / source.file_name) as shard:
            total += int(shard[source.dset_name].id.get_storage_size())
    return total


# --------------------------------------------------------------------------- parts folder


def _inspect_parts(path: Path, sample: int, check: bool) -> FeatureFileReport:
    if not (parts_dir(path) / "plan.json").exists():
        # An extraction killed before it published its plan: nothing to resume yet.
        problem = f"{path.name}: stopped before it wrote its plan; a rerun starts over"
        return FeatureFileReport(str(path), "parts", "incomplete", [problem], check)
    try:
        plan, teachers = read_parts_plan(path)
    except (FeatureStoreError, OSError, ValueError, KeyError) as error:
        return FeatureFileReport(str(path), "parts", "corrupt", [str(error)], check)
    report = _report_header(path, "parts", plan, check)
    report.bytes_on_disk = _folder_bytes(parts_dir(path))
    skipped: dict[int, str] = {}
    with ExitStack() as stack:
        for teacher in teachers:
            try:
                report.teachers.append(
                    _parts_teacher(path, plan, teacher, sample, check, stack, skipped)
                )
            except (OSError, KeyError, ValueError, RuntimeError) as error:
                report.problems.append(f"teacher '{teacher.name}': unreadable shard ({error})")
    if skipped:
        ids = [record.id for record in read_index_file(parts_dir(path) / "index.h5")]
        report.skipped_images = [
            SkippedImage(index, ids[index], skipped[index]) for index in sorted(skipped)
        ]
    options = plan.get("pseudo_masks")
    if options is not None:
        try:
            report.pseudo_masks = _parts_pseudo_masks(path, plan, options, skipped, check)
        except (OSError, KeyError, ValueError, RuntimeError) as error:
            report.problems.append(f"pseudo-masks: unreadable shard ({error})")
    in_progress = sum(1 for item in parts_dir(path).rglob(".*.tmp") if is_temporary(item))
    if in_progress:
        report.problems.append(f"{in_progress} shard(s) being written")
    return _finish(report, plan)


def _parts_teacher(
    path: Path,
    plan: dict[str, Any],
    teacher: TeacherSpec,
    sample: int,
    check: bool,
    stack: ExitStack,
    skipped: dict[int, str],
) -> TeacherReport:
    """One teacher's finished shards; adds the images they skipped to `skipped`."""
    num_images, shard_size = int(plan["num_images"]), int(plan["shard_size"])
    shards: dict[int, h5py.File] = {}
    for shard in range(shard_count(plan)):
        file = shard_path(path, teacher.name, shard)
        if file.exists():
            shards[shard] = stack.enter_context(open_read_only(file))
    done = np.zeros(num_images, dtype=bool)
    for shard, handle in shards.items():
        start = shard * shard_size
        done[start : start + handle["done"].shape[0]] = handle["done"][()]
        for local, reason in enumerate(read_skipped(handle)):
            if reason:
                skipped.setdefault(start + local, reason)
    report = _teacher_report(teacher, int(done.sum()), num_images)
    decoder = decoder_path(path, teacher.name)
    if decoder.exists():
        with open_read_only(decoder) as handle:
            report.decoder_tensors = len(handle)
    for tap in teacher.taps:

        def read(row: int, tap_name: str = tap.name) -> tuple[np.ndarray, int]:
            handle = shards[row // shard_size]
            local = row % shard_size
            return handle["taps"][tap_name][local], int(handle["crc32"][tap_name][local])

        if shards:
            first = next(iter(shards.values()))["taps"][tap.name]
            tap_report = _tap_layout(teacher.name, tap.name, first, plan)
        else:
            tap_report = TapReport(
                teacher.name, tap.name, str(tap.kind), list(tap.shape), plan["dtype"], None,
                plan["compression"], 0, 0.0,
            )  # fmt: skip
        tap_report.bytes_on_disk = sum(
            int(handle["taps"][tap.name].id.get_storage_size()) for handle in shards.values()
        )
        tap_report.bytes_per_image = tap_report.bytes_on_disk / max(int(done.sum()), 1)
        _add_statistics(tap_report, read, _rows_with_features(done, skipped), sample, check)
        report.taps.append(tap_report)
    return report


def _parts_pseudo_masks(
    path: Path, plan: dict[str, Any], options: dict[str, Any], skipped: dict[int, str], check: bool
) -> PseudoMaskReport:
    """The pseudo-masks of the finished shards of their teacher."""
    num_images, shard_size = int(plan["num_images"]), int(plan["shard_size"])
    counts = np.zeros(num_images, dtype=np.int64)
    done = np.zeros(num_images, dtype=bool)
    rows: dict[int, tuple[bytes, int, int]] = {}
    for shard in range(shard_count(plan)):
        file = shard_path(path, options["teacher"], shard)
        if not file.exists():
            continue
        with open_read_only(file) as handle:
            start = shard * shard_size
            stop = start + handle["done"].shape[0]
            done[start:stop] = handle["done"][()]
            counts[start:stop] = handle[PSEUDO_MASK_COUNTS][()]
            if check:
                texts, crc = handle[PSEUDO_MASKS][()], handle[PSEUDO_MASKS_CRC32][()]
                for local, row in enumerate(range(start, stop)):
                    rows[row] = bytes(texts[local]), int(crc[local]), int(counts[row])
    read = rows.__getitem__ if check else None
    return _pseudo_mask_report(options, counts, _rows_with_features(done, skipped), read)


# --------------------------------------------------------------------------- shared


def _report_header(
    path: Path, source: Literal["file", "parts"], plan: dict[str, Any], check: bool
) -> FeatureFileReport:
    return FeatureFileReport(
        path=str(path),
        source=source,
        status="complete",
        checked=check,
        schema_version=plan.get("schema_version"),
        created=plan.get("created"),
        dtype=plan.get("dtype"),
        compression=plan.get("compression"),
        compute=dict(plan.get("compute") or {}),
        num_images=int(plan["num_images"]),
    )


def _teacher_report(teacher: TeacherSpec, images_done: int, images_total: int) -> TeacherReport:
    return TeacherReport(
        name=teacher.name,
        model_type=teacher.model_type,
        image_size=teacher.image_size,
        checkpoint_name=teacher.checkpoint_name,
        checkpoint_sha256=teacher.checkpoint_sha256,
        images_done=images_done,
        images_total=images_total,
        decoder_tensors=0,
        frame=teacher.frame,
    )


def _describe(teacher: TeacherReport) -> str:
    """A teacher's name and model type, and its frame when it is not the pipeline's."""
    frame = ", square frame" if teacher.frame == "square" else ""
    return f"{teacher.name} ({teacher.model_type}{frame})"


def _tap_layout(teacher: str, name: str, dataset: h5py.Dataset, plan: dict[str, Any]) -> TapReport:
    chunks = None if dataset.is_virtual else dataset.chunks
    if dataset.is_virtual:
        chunks = (1, *dataset.shape[1:])  # the sources' chunking, one image per chunk
    return TapReport(
        teacher=teacher,
        name=name,
        kind=str(dataset.attrs.get("kind", "other")),
        shape=list(dataset.shape[1:]),
        dtype=str(dataset.dtype),
        chunks=list(chunks) if chunks else None,
        compression=str(plan["compression"]),
        bytes_on_disk=0,
        bytes_per_image=0.0,
    )


def _add_statistics(
    report: TapReport, read: RowReader, done_rows: np.ndarray, sample: int, check: bool
) -> None:
    """Mean / std / min / max over sampled finite values; NaN, Inf and crc32 counts."""
    if check:
        rows = done_rows
    else:
        count = min(sample, done_rows.size)
        rows = done_rows[np.linspace(0, done_rows.size - 1, count).astype(int)] if count else []
    total = total_sq = 0.0
    finite_count = 0
    low, high = np.inf, -np.inf
    for row in rows:
        stored, crc = read(int(row))
        if check and zlib.crc32(np.ascontiguousarray(stored).data) != crc:
            report.checksum_errors += 1
        values = stored.astype(np.float64)
        finite = np.isfinite(values)
        report.nan_count += int(np.isnan(values).sum())
        report.inf_count += int(np.isinf(values).sum())
        kept = values[finite]
        if kept.size:
            total += float(kept.sum())
            total_sq += float(np.square(kept).sum())
            finite_count += kept.size
            low, high = min(low, float(kept.min())), max(high, float(kept.max()))
    report.images_sampled = len(rows)
    if finite_count:
        report.mean = total / finite_count
        report.std = max(total_sq / finite_count - report.mean**2, 0.0) ** 0.5
        report.min, report.max = low, high


def _finish(report: FeatureFileReport, plan: dict[str, Any]) -> FeatureFileReport:
    """Decide the status from what was found."""
    images_done = sum(teacher.images_done for teacher in report.teachers)
    report.bytes_per_image = report.bytes_on_disk / max(report.num_images, 1)
    nonfinite_allowed = bool(plan.get("allow_nonfinite")) or bool(plan.get("allow_overflow"))
    for teacher in report.teachers:
        for tap in teacher.taps:
            where = f"teacher '{teacher.name}' tap '{tap.name}'"
            if tap.checksum_errors:
                report.problems.append(f"{where}: {tap.checksum_errors} images fail their crc32")
            if (tap.nan_count or tap.inf_count) and not nonfinite_allowed:
                report.problems.append(f"{where}: {tap.nan_count} NaN, {tap.inf_count} Inf values")
    masks = report.pseudo_masks
    if masks is not None and masks.checksum_errors:
        report.problems.append(
            f"teacher '{masks.teacher}' pseudo-masks: {masks.checksum_errors} images fail "
            "their crc32 or mask count"
        )
    corrupt = [p for p in report.problems if "being written" not in p]
    if corrupt:
        report.status = "corrupt"
    elif report.source == "parts" or images_done < report.num_images * len(report.teachers):
        report.status = "incomplete"
    return report


def _folder_bytes(folder: Path) -> int:
    if not folder.is_dir():
        return 0
    return sum(item.stat().st_size for item in folder.rglob("*") if item.is_file())


# --------------------------------------------------------------------------- rendering


def render_report(report: FeatureFileReport, console: Any = None) -> None:
    """Print the report as a rich table (to `console`, default a new rich Console)."""
    from rich import box
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console()
    colour = {"complete": "green", "incomplete": "yellow", "corrupt": "red"}[report.status]
    console.print(
        f"[bold]{report.path}[/bold] ({report.source}): [{colour}]{report.status}[/{colour}], "
        f"{report.num_images} images, {format_bytes(report.bytes_on_disk)} on disk "
        f"({format_bytes(report.bytes_per_image)} per image), dtype {report.dtype}, "
        f"compression {report.compression}" + (", all images checked" if report.checked else "")
    )
    tap_bytes = sum(tap.bytes_on_disk for teacher in report.teachers for tap in teacher.taps)
    console.print(
        f"teachers: {', '.join(_describe(t) for t in report.teachers) or '-'}; feature data "
        f"{format_bytes(tap_bytes)}, the rest is the teachers' stored decoders and the index"
        + "".join(f"; {key} {value}" for key, value in report.compute.items())
    )
    storage = Table(
        title="storage (one image per HDF5 chunk)", title_justify="left", box=box.SIMPLE_HEAD
    )
    for column in ("teacher", "tap", "shape", "done", "on disk", "per image"):
        storage.add_column(column, no_wrap=True)
    sampled = max((tap.images_sampled for t in report.teachers for tap in t.taps), default=0)
    values = Table(
        title=f"values (over {sampled} images)", title_justify="left", box=box.SIMPLE_HEAD
    )
    for column in ("teacher", "tap"):
        values.add_column(column, no_wrap=True)
    for column in ("mean", "std", "min", "max", "NaN", "Inf"):
        values.add_column(column, justify="right", no_wrap=True, min_width=3)
    for teacher in report.teachers:
        for tap in teacher.taps:
            storage.add_row(
                teacher.name,
                tap.name,
                "x".join(map(str, tap.shape)),
                f"{teacher.images_done}/{teacher.images_total}",
                format_bytes(tap.bytes_on_disk),
                format_bytes(tap.bytes_per_image),
            )
            values.add_row(
                teacher.name,
                tap.name,
                *(_number(value) for value in (tap.mean, tap.std, tap.min, tap.max)),
                str(tap.nan_count),
                str(tap.inf_count),
            )
    console.print(storage)
    console.print(values)
    if report.skipped_images:
        shown = escape(
            "; ".join(f"{image.id}: {image.reason}" for image in report.skipped_images[:5])
        )
        count = len(report.skipped_images)
        more = count - 5
        console.print(
            f"[yellow]{count} image{'s' if count > 1 else ''} skipped at extraction "
            f"(data.on_error=skip; their features are zeros): {shown}"
            + (f"; and {more} more" if more > 0 else "")
            + "[/yellow]",
            soft_wrap=True,
        )
    if report.pseudo_masks is not None:
        console.print(describe_pseudo_masks(report.pseudo_masks), soft_wrap=True)
    for problem in report.problems:
        console.print(f"[{colour}]- {problem}[/{colour}]")


def describe_pseudo_masks(masks: PseudoMaskReport) -> str:
    """One line: how many images have pseudo-masks, how many masks in all and per image."""
    line = (
        f"pseudo-masks of teacher {masks.teacher}: {masks.images_with_masks} of "
        f"{masks.images} images have some, {masks.total} masks in all"
    )
    if masks.mean is not None:
        line += f" (per image min {masks.min}, mean {masks.mean:.3g}, max {masks.max})"
    if masks.images_without_masks:
        count = masks.images_without_masks
        line += f"; {count} image{'s have' if count > 1 else ' has'} none"
    return line + f"; at most {masks.options.get('max_masks')} per image"


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"
