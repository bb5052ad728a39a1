"""At the scale users train: per-image overheads from 1,000 to 100,000 images, throughput of
real-size feature rows, and what 110k and 1.1M images need.

    python -m benchmarks --only scale            # the full run (about 30 minutes on 2 cores)
    python -m benchmarks --only scale --quick    # a few hundred images: checks that it runs
    python -m benchmarks.scale --work DIR        # keep the generated data in DIR (reused)

Three tables:

1. Per-image overheads: generated 64 px images (folder layout, one or two masks each) run
   through the real commands, each in its own process: `samkd inspect DATA`, `samkd extract`
   (a `vit_mini` teacher, shards of `extract.shard_size`, joined as virtual datasets), the
   same extraction joined by copying (a rerun over the same shards, which only joins),
   `samkd inspect --check`, `samkd train` to its first step (a first and a second start)
   and for a few steps. Wall time, peak memory and bytes written of each.
2. Real-size rows: 2,000 images of `encoder.embed` 256 x 64 x 64 float16 (generated values
   written through samkd's writer), write and join rates, and random reads as training reads
   them (0 / 2 / 4 DataLoader workers, cold and warm page cache) against the disk's
   sequential read rate measured in the same run; the first start's hashing rate on
   photograph-sized JPEG files.
3. Projections (computed, not measured) for 110k and 1.1M images with SAM ViT-H and SAM 2.1
   Hiera-L teachers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import struct
import sys
import tempfile
import time
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from rich.console import Console
from torch.utils.data import DataLoader, Dataset

from benchmarks.common import NOISE_NOTE, ResultTable, Section
from benchmarks.feature_store import drop_page_cache, single_thread
from benchmarks.processes import (
    Usage,
    cached_fraction,
    run_measured,
    sequential_read_rate,
)
from samkd.demo.shapes import make_sample
from samkd.features import (
    ExtractionPlan,
    FeatureStore,
    ImageRecord,
    TapSpec,
    TeacherSpec,
    index_images,
    join_shards,
    open_for_extraction,
)
from samkd.features.schema import parts_dir
from samkd.files import format_bytes

NAME = "scale"
REPO_ROOT = Path(__file__).resolve().parents[1]
MiB = 1 << 20
GiB = 1 << 30


@dataclass(frozen=True)
class Sizes:
    counts: tuple[int, ...]  # images of the per-image overhead runs
    train_steps: int  # steps of the "few steps" run
    long_steps: int  # steps of the long run whose memory is followed
    real_rows: int  # rows of real-size features
    jpegs: int  # photograph-sized JPEG files hashed
    steps: tuple[str, ...] = ()  # the steps of table 1 run (default: all of `STEPS`)
    read_workers: tuple[int, ...] = (0, 2, 4)  # DataLoader workers of the real-size reads


FULL = Sizes(counts=(1_000, 10_000, 100_000), train_steps=20, long_steps=1500, real_rows=2000,
             jpegs=1000)  # fmt: skip
# One count, three commands, and the few-steps run stands for the long one.
QUICK = Sizes(
    counts=(200,), train_steps=3, long_steps=0, real_rows=16, jpegs=8,
    steps=("extract", "join", "train_steps"), read_workers=(0, 2),
)  # fmt: skip

IMAGE_SIDE = 64
POOL = 256  # distinct generated samples; every file still differs (see `write_dataset`)
TEACHER = "vit_mini"
STUDENT = "vit_t_mini"
BATCH = 8
WORKERS = 2
EMBED = TapSpec("encoder.embed", (256, 64, 64))
JPEG_BYTES = 150_000  # a photograph of SA-1B's kind: 1500 x 2250, about 150 KB to 500 KB


# --------------------------------------------------------------------------- data


def _png_with_text(png: bytes, text: bytes) -> bytes:
    """`png` with a tEXt chunk before its IEND: other bytes, the same pixels."""
    chunk = b"tEXt" + b"samkd\0" + text
    record = struct.pack(">I", len(chunk) - 4) + chunk + struct.pack(">I", zlib.crc32(chunk))
    return png[:-12] + record + png[-12:]


def _encoded(array: np.ndarray) -> bytes:
    with tempfile.SpooledTemporaryFile() as buffer:
        Image.fromarray(array).save(buffer, format="PNG")
        buffer.seek(0)
        return buffer.read()


def write_dataset(root: Path, count: int, seed: int = 0) -> Path:
    """`count` generated `IMAGE_SIDE` px images in the folder layout, with one or two masks
    each: `POOL` distinct samples, each file made distinct by a text chunk naming its image
    (so that every sha256 differs), written without re-encoding (100k images in about a
    minute). Skipped when `root` already holds them."""
    marker = root / ".complete"
    if marker.exists() and int(marker.read_text()) == count:
        return root
    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(seed)
    samples = [make_sample(rng, IMAGE_SIDE, IMAGE_SIDE, 2) for _ in range(POOL)]
    images = [_encoded(image) for image, _ in samples]
    masks = [[_encoded(mask.astype(np.uint8) * 255) for mask in found] for _, found in samples]
    (root / "image").mkdir(parents=True)
    (root / "mask").mkdir()
    for index in range(count):
        image_id = f"img_{index:07d}"
        (root / "image" / f"{image_id}.png").write_bytes(
            _png_with_text(images[index % POOL], image_id.encode())
        )
        folder = root / "mask" / image_id
        folder.mkdir()
        for number, mask in enumerate(masks[index % POOL]):
            (folder / f"obj_{number}.png").write_bytes(mask)
    marker.write_text(str(count))
    return root


def write_jpegs(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """`count` photograph-like JPEG files of about `JPEG_BYTES` each (smooth colour fields
    with noise at 1024 x 768, quality 85)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for index in range(count):
        coarse = rng.uniform(0, 255, size=(6, 8, 3)).astype(np.uint8)
        smooth = np.asarray(Image.fromarray(coarse).resize((1024, 768), Image.Resampling.BICUBIC))
        noisy = np.clip(smooth + rng.normal(0, 9, size=smooth.shape), 0, 255).astype(np.uint8)
        path = folder / f"photo_{index:06d}.jpg"
        Image.fromarray(noisy).save(path, quality=85)
        paths.append(path)
    return paths


# --------------------------------------------------------------------------- commands


def samkd_command(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "samkd", *arguments]


def environment() -> dict[str, str]:
    """The commands import this checkout's samkd."""
    path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path}


def settings_file(work: Path, data: Path) -> Path:
    """Settings shared by the commands of one dataset (written once, read with --config)."""
    path = work / "settings.yaml"
    path.write_text(
        json.dumps(
            {
                "data": {"train": str(data), "image_size": IMAGE_SIDE, "num_workers": WORKERS},
                "student": {"model_type": STUDENT},
                "teachers": [{"name": "t", "model_type": TEACHER}],
                "extract": {"batch_size": 32},
                # MobileSAM's recipe: encoder distillation alone, no mask loss.
                "train": {
                    "batch_size": BATCH,
                    "warmup_steps": 0,
                    "device": "cpu",
                    "task_loss": False,
                },
                "logging": {"tensorboard": False, "log_every": 1000},
            }
        )
    )
    return path


@dataclass(frozen=True)
class CountResult:
    count: int
    usages: dict[str, Usage]
    feature_bytes: int  # tap data of the file (what a copy join copies)
    output_bytes: int  # the copy-joined file
    layouts: dict[str, LayoutReads]  # opening and reading each join layout


STEPS = (
    ("inspect", "`samkd inspect DATA`"),
    ("extract", "`samkd extract` (virtual join)"),
    ("join", "the same, copy join (rerun: joins only)"),
    ("check", "`samkd inspect --check` (copy)"),
    ("train_first", "`samkd train` to step 1, first start"),
    ("train_second", "`samkd train` to step 1, second start"),
    ("train_steps", "`samkd train`, a few steps"),
)


def run_count(work: Path, count: int, sizes: Sizes) -> CountResult:
    """Every command of table 1 on `count` generated images, each in its own process."""
    folder = work / f"n{count}"
    folder.mkdir(parents=True, exist_ok=True)
    data = write_dataset(folder / "data", count)
    config = settings_file(folder, data)
    for stale in ("virtual.h5", "copy.h5"):
        remove_feature_file(folder / stale)
    shutil.rmtree(folder / "runs", ignore_errors=True)
    env = environment()
    usages: dict[str, Usage] = {}

    def measure(step: str, *arguments: str) -> None:
        if not sizes.steps or step in sizes.steps:
            usages[step] = run_measured(samkd_command(*arguments), env=env)

    virtual, copy = folder / "virtual.h5", folder / "copy.h5"
    measure("inspect", "inspect", str(data))
    common = ("extract", "--config", str(config))
    measure("extract", *common, "--output", str(virtual), "--set", "extract.join=virtual")
    hard_link_tree(parts_dir(virtual), parts_dir(copy))
    measure("join", *common, "--output", str(copy), "--set", "extract.join=copy")
    measure("check", "inspect", "--check", str(copy))
    train = ("train", "--config", str(config), "--features", str(copy))
    for start in ("first", "second"):
        run_dir = str(folder / "runs" / start)
        measure(f"train_{start}", *train, "--steps", "1", "--output-dir", run_dir)
    steps = str(sizes.train_steps)
    measure("train_steps", *train, "--steps", steps, "--output-dir", str(folder / "runs/steps"))
    feature_bytes = count * 256 * (IMAGE_SIDE // 16) ** 2 * 2  # float16 `encoder.embed`
    layouts = compare_layouts({"copy": copy, "virtual": virtual})
    return CountResult(count, usages, feature_bytes, copy.stat().st_size, layouts)


def measured_steps(results: Sequence[CountResult]) -> list[tuple[str, str]]:
    return [(step, label) for step, label in STEPS if step in results[0].usages]


def remove_feature_file(path: Path) -> None:
    path.unlink(missing_ok=True)
    shutil.rmtree(parts_dir(path), ignore_errors=True)


def hard_link_tree(source: Path, target: Path) -> None:
    """A copy of `source` whose files are hard links: no data copied."""
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target, copy_function=os.link)


@dataclass(frozen=True)
class LayoutReads:
    """One layout's open time and read rates (best of the rounds)."""

    open_seconds: float  # FeatureStore open and its first row
    first_pass: float  # rows/s of the first pass, which learns where each shard's rows are
    steady: float  # rows/s of the same rows again


def compare_layouts(files: dict[str, Path], rows: int = 2000) -> dict[str, LayoutReads]:
    """Per layout, in one process (as stored, checked, warm page cache): the open time, and
    random rows/s in a first and a second pass over the same rows, the layouts alternating
    over 3 rounds, each with a new store."""
    best: dict[str, LayoutReads] = {}
    for _ in range(3):
        for layout, path in files.items():
            began = time.perf_counter()
            store = FeatureStore(path, dtype=None)
            store.read(0)
            opened = time.perf_counter() - began
            order = np.random.default_rng(1).permutation(len(store))[:rows].tolist()
            first, steady = (rows_per_second(store, order) for _ in range(2))
            store.close()
            found = LayoutReads(opened, first, steady)
            if layout in best:
                kept = best[layout]
                found = LayoutReads(
                    min(opened, kept.open_seconds),
                    max(first, kept.first_pass),
                    max(steady, kept.steady),
                )
            best[layout] = found
    return best


def rows_per_second(store: FeatureStore, order: Sequence[int]) -> float:
    began = time.perf_counter()
    for row in order:
        store.read(row)
    return len(order) / (time.perf_counter() - began)


# --------------------------------------------------------------------------- long run


@dataclass(frozen=True)
class LongRun:
    steps: int
    usage: Usage
    count: int


def run_long(work: Path, count: int, steps: int) -> LongRun:
    """`samkd train` for `steps` steps on the `count`-image file with `WORKERS` workers,
    its process tree's memory sampled throughout."""
    folder = work / f"n{count}"
    config = folder / "settings.yaml"
    run_dir = folder / "runs/long"
    shutil.rmtree(run_dir, ignore_errors=True)
    usage = run_measured(
        samkd_command(
            "train", "--config", str(config), "--features", str(folder / "copy.h5"),
            "--steps", str(steps), "--output-dir", str(run_dir),
            "--set", f"train.checkpoint_every={steps}",
        ),
        env=environment(),
    )  # fmt: skip
    return LongRun(steps, usage, count)


def memory_growth(usage: Usage) -> tuple[float, float, float]:
    """Tree PSS (bytes) at 25% of the run and near its end, and its growth from the middle
    to the end, relative to the middle: medians of the samples around 50% and of those
    between 75% and 95% of the run (its last moments export the student)."""
    values = [sample.tree_pss for sample in usage.samples]
    if len(values) < 8:
        return 0.0, 0.0, 0.0
    count = len(values)
    middle = statistics.median(values[int(0.45 * count) : int(0.55 * count) + 1])
    end = statistics.median(values[int(0.75 * count) : int(0.95 * count) + 1])
    return values[count // 4], end, (end - middle) / middle


# --------------------------------------------------------------------------- real size


@dataclass(frozen=True)
class RealSize:
    rows: int
    row_bytes: int
    write_rate: float  # bytes/s of the writer, shards on disk
    join_rates: dict[str, float]  # bytes/s of the feature data, by layout
    join_written: dict[str, int]  # bytes the join wrote, by layout
    output_bytes: dict[str, int]  # the joined file, by layout
    sequential: float  # bytes/s, the disk read from end to end, cold
    sequential_how: str
    reads: dict[tuple[str, int, str], float]  # (layout, workers, cache) -> rows/s
    cold_residue: float  # largest cached fraction left after a drop
    layouts: dict[str, LayoutReads]  # one process, warm cache
    hash_files: int
    hash_bytes: int
    hash_seconds: float
    handover: tuple[float, float]  # seconds per row: fresh shared memory, reused memory

    @property
    def workers(self) -> list[int]:
        return sorted({workers for _, workers, _ in self.reads})


class Rows(Dataset):
    """Feature rows as training reads them: as stored (float16), crc32-checked."""

    def __init__(self, path: Path):
        self.store = FeatureStore(path, dtype=None)

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.store.read(index)["t"][EMBED.name]

    def __getitems__(self, indices: list[int]) -> list[torch.Tensor]:
        """A batch, its rows asked of the disk together first, as `DistillationDataset`."""
        self.store.prefetch(indices)
        return [self[index] for index in indices]


def generated_rows(indices: Sequence[int], pool: np.ndarray) -> np.ndarray:
    """Stand-in embeddings: rows of a random pool, each marked with its index."""
    rows = pool[np.asarray(indices) % len(pool)].copy()
    rows[:, 0, 0, 0] = np.asarray(indices, dtype=np.float16)
    return rows


def write_real_size(output: Path, rows: int, batch: int = 16) -> float:
    """Write `rows` generated `EMBED` rows through samkd's writer, as shards (not joined);
    returns the bytes/s from the first batch to the last shard on disk."""
    images = tuple(ImageRecord(f"{i:07d}.jpg", 1500, 2250, "0" * 64) for i in range(rows))
    plan = ExtractionPlan(images, (TeacherSpec("t", "vit_h", 1024, (EMBED,)),), shard_size=64)
    pool = np.random.default_rng(0).standard_normal((8, *EMBED.shape), dtype=np.float32)
    pool = pool.astype(np.float16)
    began = time.perf_counter()
    with open_for_extraction(output, plan, check_free_space=True) as writer:
        for start in range(0, rows, batch):
            indices = list(range(start, min(start + batch, rows)))
            writer.write_batch("t", indices, {EMBED.name: generated_rows(indices, pool)})
        writer.finish(join=False)
    os.sync()
    return rows * EMBED.numel * 2 / (time.perf_counter() - began)


def bytes_written_by_me() -> int:
    """This process's bytes written to the block layer so far (/proc/self/io)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    return 0


def timed_join(output: Path, layout: str, data_bytes: int) -> tuple[float, int]:
    """(bytes/s of feature data, bytes written) of joining `output`'s shards."""
    before = bytes_written_by_me()
    began = time.perf_counter()
    join_shards(output, layout=layout, keep_parts=True)  # type: ignore[arg-type]
    os.sync()
    seconds = time.perf_counter() - began
    return data_bytes / seconds, bytes_written_by_me() - before


def read_rate(path: Path, workers: int, cold: bool) -> tuple[float, float]:
    """Rows/s of one pass over the file in random order, read as `samkd train` reads them:
    batches of `BATCH` indices, each row read into its own tensor (in shared memory in a
    worker) and passed on as is, the batch stacked in the main process. Also the largest
    fraction of a file still cached after the drop (cold only)."""
    dataset = Rows(path)
    residue = 0.0
    if cold:
        files = [path, *sorted(parts_dir(path).rglob("part-*.h5"))]
        drop_page_cache(files)
        residue = max(cached_fraction(file) for file in files)
    order = np.random.default_rng(workers).permutation(len(dataset)).tolist()
    batches = [order[start : start + BATCH] for start in range(0, len(order), BATCH)]
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=workers, collate_fn=list)
    began = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "This DataLoader will create", UserWarning)
        rows = sum(torch.stack(batch).shape[0] for batch in loader)
    seconds = time.perf_counter() - began
    dataset.store.close()
    return rows / seconds, residue


def row_handover_seconds(rounds: int = 100) -> tuple[float, float]:
    """CPU seconds to fill one real-size row in fresh shared memory (what a DataLoader worker
    hands to the main process: tmpfs pages allocated, zeroed and faulted in) and in ordinary
    memory, which the allocator reuses; the rest of a read costs the same in both."""
    size = EMBED.numel * 2

    def fill(shared: bool) -> None:
        if shared:
            storage = torch.UntypedStorage._new_shared(size)
            torch.empty(0, dtype=torch.float16).set_(storage).fill_(1)
        else:
            torch.empty(EMBED.numel, dtype=torch.float16).fill_(1)

    costs = []
    for shared in (True, False):
        began = time.perf_counter()
        for _ in range(rounds):
            fill(shared)
        costs.append((time.perf_counter() - began) / rounds)
    return costs[0], costs[1]


def hash_rate(folder: Path, count: int) -> tuple[int, int, float]:
    """(files, bytes, seconds) of indexing `count` JPEG files from a cold cache, as the first
    start of `samkd extract` does (`index_images`: stat, image size, sha256, on threads)."""
    paths = write_jpegs(folder, count)
    drop_page_cache(paths)
    began = time.perf_counter()
    index_images(paths, [path.stem for path in paths], {})
    seconds = time.perf_counter() - began
    return len(paths), sum(path.stat().st_size for path in paths), seconds


def run_real_size(work: Path, sizes: Sizes) -> RealSize:
    folder = work / "real"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    copy, virtual = folder / "copy.h5", folder / "virtual.h5"
    write = write_real_size(copy, sizes.real_rows)
    data_bytes = sizes.real_rows * EMBED.numel * 2
    hard_link_tree(parts_dir(copy), parts_dir(virtual))
    join_rates, join_written = {}, {}
    for layout, path in (("virtual", virtual), ("copy", copy)):
        join_rates[layout], join_written[layout] = timed_join(path, layout, data_bytes)
    shutil.rmtree(parts_dir(copy))  # the copy needs its shards no more
    output_bytes = {"copy": copy.stat().st_size, "virtual": virtual.stat().st_size}
    sequential, how = sequential_read_rate(copy)
    reads: dict[tuple[str, int, str], float] = {}
    residue = 0.0
    with single_thread():
        for workers in sizes.read_workers:
            for layout, path in (("copy", copy), ("virtual", virtual)):
                rate, left = read_rate(path, workers, cold=True)
                reads[layout, workers, "cold"] = rate
                residue = max(residue, left)
                reads[layout, workers, "warm"] = read_rate(path, workers, cold=False)[0]
        layouts = compare_layouts({"copy": copy, "virtual": virtual}, min(sizes.real_rows, 500))
        handover = row_handover_seconds()
    files, hashed, seconds = hash_rate(folder / "jpegs", sizes.jpegs)
    return RealSize(
        sizes.real_rows, EMBED.numel * 2, write, join_rates, join_written, output_bytes,
        sequential, how, reads, residue, layouts, files, hashed, seconds, handover,
    )  # fmt: skip


# --------------------------------------------------------------------------- projections


@dataclass(frozen=True)
class Teacher:
    """A teacher of the projection: its stored taps' bytes per image and its published
    image rate on one GPU (an anchor, not measured here)."""

    label: str
    tap_values: tuple[int, ...]  # values per image of each stored tap
    images_per_s: float
    anchor: str


VIT_H_EMBED = 256 * 64 * 64
# SAM 2.1's image encoder also gives two high-resolution feature maps to its mask decoder
# (`backbone_fpn` levels 0 and 1 after the decoder's 1x1 convolutions: 32 x 256 x 256 and
# 64 x 128 x 128 at 1024 px), to be stored for decoder distillation.
HIERA_HIGH_RES = 32 * 256 * 256 + 64 * 128 * 128
SEGMENT_ANYTHING_FAST = (
    "segment-anything-fast (pytorch-labs), SAM ViT-H on an A100: 2.8 images/s in fp32, 22 with "
    "bf16, SDPA and torch.compile"
)
SAM2_README = (
    "facebookresearch/sam2 README, sam2.1_hiera_large on an A100 (torch 2.5.1, compiled): 39.5 "
    "FPS per video frame, image encoder, memory attention and decoder together, so an upper "
    "bound of the time an image's encoding takes"
)
TEACHERS = (
    Teacher("SAM ViT-H, fp32", (VIT_H_EMBED,), 2.8, SEGMENT_ANYTHING_FAST),
    Teacher("SAM ViT-H, bf16 + SDPA + compile", (VIT_H_EMBED,), 22.0, SEGMENT_ANYTHING_FAST),
    Teacher("SAM 2.1 Hiera-L, embedding", (VIT_H_EMBED,), 39.5, SAM2_README),
    Teacher("SAM 2.1 Hiera-L, + high-res maps", (VIT_H_EMBED, HIERA_HIGH_RES), 39.5, SAM2_README),
)
PROJECTED_IMAGES = (110_000, 1_100_000)
STUDENT_RATE = 100  # images/s of one GPU training the student: an assumed rate, not measured
ROW_OVERHEAD = 128 + 4 + 1  # HDF5's chunk index entry, the crc32 and the done flag


def row_bytes(teacher: Teacher) -> int:
    return sum(values * 2 + ROW_OVERHEAD for values in teacher.tap_values)


def projection_table(read_bytes_per_s: float, join_bytes_per_s: float) -> ResultTable:
    """Sizes and times of the teachers at `PROJECTED_IMAGES`: extraction at the anchor's rate,
    a copy join at this run's join rate, reads against this run's best cold read rate."""
    table = ResultTable(
        [
            "teacher (projection)",
            "images",
            "feature file",
            "disk during a copy join",
            "extraction, 1 GPU",
            "copy join here",
            f"reads needed at {STUDENT_RATE} img/s",
            "student img/s this disk's reads feed",
        ],
        title="3. Projections: computed from the anchors and this run's reads, not measured",
    )
    for teacher in TEACHERS:
        per_image = row_bytes(teacher)
        for images in PROJECTED_IMAGES:
            size = images * per_image
            table.add(
                teacher.label,
                f"{images:,}",
                format_bytes(size),
                format_bytes(2 * size),
                duration(images / teacher.images_per_s),
                duration(size / join_bytes_per_s),
                f"{STUDENT_RATE * per_image / MiB:,.0f} MiB/s",
                f"{read_bytes_per_s / per_image:,.0f}",
            )
    return table


def duration(seconds: float) -> str:
    if seconds >= 2 * 86400:
        return f"{seconds / 86400:.1f} days"
    if seconds >= 2 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.0f} min"


# --------------------------------------------------------------------------- the section


def mib(value: float) -> str:
    return f"{value / MiB:,.0f}"


def per_image_tables(results: Sequence[CountResult]) -> list[ResultTable]:
    """Wall time and peak memory of every step at every count, per image, and how the
    memory grows with the images."""
    counts = [result.count for result in results]
    small, large = (results[-2], results[-1]) if len(results) > 1 else (results[0], results[0])
    compared = len(results) > 1
    times = ResultTable(
        [
            "step",
            *[f"s at {count:,}" for count in counts],
            f"ms/image at {small.count:,}",
            f"ms/image at {large.count:,}",
            "ratio",
        ],
        title="1. Per-image overheads: wall time",
    )
    memory = ResultTable(
        [
            "step",
            *[f"peak MiB at {count:,}" for count in counts],
            f"KiB/image at {small.count:,}",
            f"at {large.count:,}",
            "ratio",
            f"growth, KiB/image, {small.count:,} to {large.count:,}",
            f"MiB at {PROJECTED_IMAGES[-1]:,} (projected)",
        ],
        title="1. Per-image overheads: peak resident memory (the process or its largest child)",
    )
    for step, label in measured_steps(results):
        seconds = [result.usages[step].seconds for result in results]
        per_small = small.usages[step].seconds / small.count * 1e3
        per_large = large.usages[step].seconds / large.count * 1e3
        times.add(
            label,
            *[f"{value:.1f}" for value in seconds],
            f"{per_small:.3f}",
            f"{per_large:.3f}",
            f"{per_large / per_small:.2f}x" if compared else "-",
        )
        peak_small, peak_large = small.usages[step].peak_rss, large.usages[step].peak_rss
        growth = memory_growth_per_image(small, large, step)
        memory.add(
            label,
            *[mib(result.usages[step].peak_rss) for result in results],
            f"{peak_small / 1024 / small.count:.2f}",
            f"{peak_large / 1024 / large.count:.2f}",
            f"{(peak_large / large.count) / (peak_small / small.count):.2f}x" if compared else "-",
            f"{growth / 1024:.2f}" if compared else "-",
            mib(peak_large + growth * (PROJECTED_IMAGES[-1] - large.count)) if compared else "-",
        )
    return [times, memory]


def memory_growth_per_image(small: CountResult, large: CountResult, step: str) -> float:
    """Bytes of peak memory that each image beyond `small.count` added (0 if it fell)."""
    if large.count == small.count:
        return 0.0
    extra = large.usages[step].peak_rss - small.usages[step].peak_rss
    return max(extra, 0) / (large.count - small.count)


def layout_table(results: Sequence[CountResult], real: RealSize) -> ResultTable:
    table = ResultTable(
        ["file", "open + first row (ms), copy", "virtual", "ratio", "rows/s, copy",
         "virtual, first pass", "virtual, again", "copy / virtual again"],
        title="Virtual join against the copy: opening and reading (one process, warm cache)",
    )  # fmt: skip
    rows = [(f"{result.count:,} images, 64 px", result.layouts) for result in results]
    rows.append((f"{real.rows:,} real-size rows", real.layouts))
    for label, layouts in rows:
        copy, virtual = layouts["copy"], layouts["virtual"]
        table.add(
            label,
            f"{copy.open_seconds * 1e3:.1f}",
            f"{virtual.open_seconds * 1e3:.1f}",
            f"{virtual.open_seconds / copy.open_seconds:.2f}x",
            f"{copy.steady:,.0f}",
            f"{virtual.first_pass:,.0f}",
            f"{virtual.steady:,.0f}",
            f"{copy.steady / virtual.steady:.2f}x",
        )
    return table


def join_table(results: Sequence[CountResult], real: RealSize) -> ResultTable:
    table = ResultTable(
        ["join", "wall s", "feature data", "written", "written / output file"],
        title="The copy join writes the data once",
    )
    for result in results:
        usage = result.usages["join"]
        table.add(
            f"{result.count:,} images (`samkd extract`, rerun that joins)",
            f"{usage.seconds:.1f}",
            format_bytes(result.feature_bytes),
            format_bytes(usage.written),
            f"{usage.written / result.output_bytes:.2f}x",
        )
    data = real.rows * real.row_bytes
    for layout in ("copy", "virtual"):
        table.add(
            f"{real.rows:,} real-size rows, {layout} (`join_shards`)",
            f"{data / real.join_rates[layout]:.1f}",
            format_bytes(data),
            format_bytes(real.join_written[layout]),
            f"{real.join_written[layout] / real.output_bytes[layout]:.2f}x",
        )
    return table


def long_run_table(run: LongRun) -> ResultTable:
    quarter, end, growth = memory_growth(run.usage)
    table = ResultTable(
        ["run", "steps", "wall s", "PSS at 25% (MiB)", "PSS at the end", "second-half growth",
         "peak PSS", "peak RSS sum", "largest process"],
        title=f"`samkd train` on the {run.count:,}-image file, {WORKERS} workers: memory over a "
        "long run (process tree, sampled every 0.25 s)",
    )  # fmt: skip
    usage = run.usage
    table.add(
        f"{run.count:,} images, batch {BATCH}",
        f"{run.steps:,}",
        f"{usage.seconds:.0f}",
        mib(quarter),
        mib(end),
        f"{growth * 100:+.1f}%",
        mib(usage.peak_tree_pss),
        mib(usage.peak_tree_rss),
        mib(usage.peak_rss),
    )
    return table


def real_size_table(real: RealSize) -> ResultTable:
    table = ResultTable(
        ["real-size rows (generated values)", "rows/s", "MiB/s", "/ sequential read"],
        title=f"2. Throughput at real size: {real.rows:,} rows of `encoder.embed` "
        f"{' x '.join(map(str, EMBED.shape))} float16 ({format_bytes(real.rows * real.row_bytes)})",
    )
    sequential = real.sequential
    table.add(f"disk, sequential read ({real.sequential_how}), cold", "", mib(sequential), "1.00x")
    row = real.row_bytes
    table.add("write through `FeatureWriter` (shards)", f"{real.write_rate / row:,.0f}",
              mib(real.write_rate), "")  # fmt: skip
    for layout in ("copy", "virtual"):
        for workers in real.workers:
            for cache in ("cold", "warm"):
                rate = real.reads[layout, workers, cache]
                table.add(
                    f"random reads, {layout}, {workers} workers, {cache}",
                    f"{rate:,.0f}",
                    mib(rate * row),
                    f"{rate * row / sequential:.2f}x",
                )
    shared, plain = real.handover
    table.add(
        "CPU to fill a row in fresh shared memory (a worker's output)",
        f"{1 / shared:,.0f}",
        mib(row / shared),
        f"{row / shared / sequential:.2f}x",
    )
    table.add("the same in reused memory", f"{1 / plain:,.0f}", mib(row / plain),
              f"{row / plain / sequential:.2f}x")  # fmt: skip
    hashed = real.hash_bytes / real.hash_seconds
    table.add(
        f"first start: hashing {real.hash_files:,} JPEG files of "
        f"{real.hash_bytes / real.hash_files / 1000:.0f} KB, cold",
        f"{real.hash_files / real.hash_seconds:,.0f}",
        mib(hashed),
        f"{hashed / sequential:.2f}x",
    )
    return table


def target_notes(results: Sequence[CountResult], long: LongRun, real: RealSize) -> list[str]:
    """Each target of the section, met or not, with its numbers."""
    notes = []
    if len(results) < 2:
        notes.append("Quick run: one count, so the per-image targets compare nothing.")
    small, large = results[-2:] if len(results) > 1 else (results[0], results[0])
    slower = [
        f"{label} {ratio:.2f}x"
        for step, label in measured_steps(results)
        if (ratio := (large.usages[step].seconds / large.count)
            / (small.usages[step].seconds / small.count)) > 1.5
    ]  # fmt: skip
    notes.append(
        f"Target: time per image at {large.count:,} within 1.5x of {small.count:,}: "
        + (f"missed by {', '.join(slower)}." if slower else "met by every step.")
    )
    heavier = [
        f"{label} {ratio:.2f}x"
        for step, label in measured_steps(results)
        if (ratio := (large.usages[step].peak_rss / large.count)
            / (small.usages[step].peak_rss / small.count)) > 1.5
    ]  # fmt: skip
    growth = max(memory_growth_per_image(small, large, step) for step, _ in measured_steps(results))
    notes.append(
        f"Target: peak memory per image at {large.count:,} within 1.5x of {small.count:,}: "
        + (f"missed by {', '.join(heavier)}." if heavier else "met by every step.")
        + f" What each image adds is at most {growth / 1024:.2f} KiB (the dataset's records, "
        "ids, hashes, chunk offsets and checksums in the process): "
        f"{format_bytes(growth * PROJECTED_IMAGES[-1])} at {PROJECTED_IMAGES[-1]:,} images."
    )
    if "train_first" in large.usages:
        start = large.usages["train_first"].seconds
        notes.append(
            f"Target: `samkd train` on {large.count:,} images done with its first step within "
            f"60 s: {start:.0f} s, the whole command ({'met' if start <= 60 else 'missed'})."
        )
    _, end, growth = memory_growth(long.usage)
    peak = long.usage.peak_tree_pss
    notes.append(
        f"Target: `samkd train` on the {long.count:,}-image file under 2 GiB with {WORKERS} "
        f"workers, flat over a long run: peak PSS of the process tree {mib(peak)} MiB "
        f"({'met' if peak < 2 * GiB else 'missed'}), {growth * 100:+.1f}% over the second half "
        f"of {long.steps:,} steps ({'flat' if abs(growth) < 0.05 else 'not flat'}); the summed "
        f"RSS, which counts pages shared by the workers once per process, peaked at "
        f"{mib(long.usage.peak_tree_rss)} MiB."
    )
    fractions = {
        (layout, workers): real.reads[layout, workers, "cold"] * real.row_bytes / real.sequential
        for layout in ("copy", "virtual")
        for workers in real.workers
        if workers
    }
    low = [f"{layout} {workers} workers {value:.2f}x" for (layout, workers), value in
           fractions.items() if value < 0.8]  # fmt: skip
    notes.append(
        "Target: cold random reads of real-size rows with 2-4 workers at 0.8x the disk's "
        "sequential read or more: "
        + (
            f"missed: {', '.join(low)}."
            if low
            else f"met ({min(fractions.values()):.2f}x or more)."
        )
        + " With workers, warm reads are no faster than cold ones where the CPU is the bound: "
        f"{real.handover[0] * 1e3:.2f} ms to fill each row in fresh shared memory (how a worker "
        f"hands it over) against {real.handover[1] * 1e3:.2f} ms in reused memory, on cores "
        "that the workers share with the main process (and, here, with other jobs)."
    )
    copies = [result.usages["join"].written / result.output_bytes for result in results] + [
        real.join_written["copy"] / real.output_bytes["copy"]
    ]
    notes.append(
        "Target: a copy join copies at most once: it wrote "
        f"{min(copies):.2f}x-{max(copies):.2f}x its output file "
        f"({'met' if max(copies) < 1.1 else 'missed'}); a virtual join writes only metadata."
    )
    ratios = [
        (
            layouts["virtual"].open_seconds / layouts["copy"].open_seconds,
            layouts["copy"].steady / layouts["virtual"].steady,
        )
        for layouts in [result.layouts for result in results] + [real.layouts]
    ]
    worst_open, worst_read = max(r[0] for r in ratios), max(r[1] for r in ratios)
    met = worst_open <= 1.2 and worst_read <= 1.2
    notes.append(
        "Target: the virtual layout's open time and read speed within 1.2x of the copy's: "
        f"{'met' if met else 'missed'} (open at most {worst_open:.2f}x, reads at most "
        f"{worst_read:.2f}x slower)."
    )
    return notes


def description(sizes: Sizes, real: RealSize, loads: tuple[float, float]) -> str:
    counts = ", ".join(f"{count:,}" for count in sizes.counts)
    return (
        f"Generated {IMAGE_SIDE} px images ({counts}; folder layout, one or two masks each; "
        f"{POOL} distinct samples, every file distinct), through the real commands, each in "
        f"its own process: a `{TEACHER}` teacher (random weights) at batch 32, "
        f"`extract.shard_size` 64, `{STUDENT}` student, batch {BATCH}, {WORKERS} DataLoader "
        "workers, encoder distillation alone (MobileSAM's recipe, `train.task_loss: false`). "
        "Peak memory is `ru_maxrss` of the command (its own or its largest child's); "
        "`samkd train` is also followed as a process tree (PSS, sampled). Written bytes are "
        "`ru_oublock`. Real-size rows hold generated values (a random pool, each row marked), "
        "written through samkd's own writer; reads go through `FeatureStore` as `samkd train` "
        "reads (as stored, crc32-checked, a tensor per row, stacked in the main process), "
        "torch single-threaded. Cold: each file's pages dropped with "
        "`posix_fadvise(POSIX_FADV_DONTNEED)` before the pass (at most "
        f"{real.cold_residue * 100:.0f}% of a file was still cached after it, by `mincore`); "
        "`/proc/sys/vm/drop_caches` would drop every file of everyone on the machine. The "
        "disk's sequential rate is the same file read from start to end after the same drop. "
        "This machine is a virtual one: a cold read here may still come from the host's "
        f"cache. Load average {loads[0]:.1f} at the start, {loads[1]:.1f} at the end."
    )


def run(quick: bool = False, work: Path | None = None) -> Section:
    sizes = QUICK if quick else FULL
    loads = os.getloadavg()[0]
    folder = work or Path(tempfile.mkdtemp(prefix="samkd-bench-scale-"))
    try:
        results = [run_count(folder, count, sizes) for count in sizes.counts]
        long = LongRun(sizes.train_steps, results[-1].usages["train_steps"], sizes.counts[-1])
        if sizes.long_steps:
            long = run_long(folder, sizes.counts[-1], sizes.long_steps)
        real = run_real_size(folder, sizes)
    finally:
        if work is None:
            shutil.rmtree(folder, ignore_errors=True)
    sequential = real.sequential
    best_cold = max(real.reads["copy", workers, "cold"] for workers in real.workers)
    tables = [
        *per_image_tables(results),
        long_run_table(long),
        join_table(results, real),
        layout_table(results, real),
        real_size_table(real),
        projection_table(best_cold * real.row_bytes, real.join_rates["copy"]),
    ]
    notes = [
        *target_notes(results, long, real),
        f"Projections use {SEGMENT_ANYTHING_FAST}, and {SAM2_README}. The student rate of "
        f"{STUDENT_RATE} images/s per GPU is an assumption (no GPU measured it here); the "
        "copy join runs at this run's join rate "
        f"({mib(real.join_rates['copy'])} MiB/s), and the last column is this run's best cold "
        "random read rate "
        f"({mib(best_cold * real.row_bytes)} MiB/s, disk sequential {mib(sequential)} MiB/s) "
        "divided by the bytes of one image's row.",
        NOISE_NOTE,
    ]
    return Section(
        NAME,
        "At scale: 1k to 100k images, real-size rows, projections",
        description(sizes, real, (loads, os.getloadavg()[0])),
        tables,
        notes,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few hundred images")
    parser.add_argument("--work", type=Path, help="keep (and reuse) the generated data here")
    args = parser.parse_args()
    from benchmarks.__main__ import print_section

    print_section(run(args.quick, args.work), Console())


if __name__ == "__main__":
    main()
