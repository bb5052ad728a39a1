"""`samkd extract`: run the teachers over a dataset and store their features in HDF5."""

from __future__ import annotations

import copy
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from segment_anything.modeling import Sam
from torch.utils.data import DataLoader, Dataset

from samkd.data import (
    SAM_PIXEL_MEAN,
    SAM_PIXEL_STD,
    DataError,
    Sample,
    SampleBatch,
    SegmentationDataset,
    build_dataset,
    collate_samples,
)
from samkd.data.errors import OnError, handle_error
from samkd.distill import coarse_attention_map
from samkd.errors import UsageError
from samkd.features import (
    ExtractionPlan,
    FeatureStoreError,
    FeatureWriter,
    ImageRecord,
    changed_image,
    format_bytes,
    index_images,
    join_shards,
    known_images,
    missing_shards,
    open_for_extraction,
    plan_from_settings,
    planned_bytes,
    teacher_taps,
    wait_for_index,
)
from samkd.features.images import Progress, describe_image_file, first_id_difference
from samkd.features.lock import job_id, output_lock, wait_for_job
from samkd.features.pseudo_masks import generate_pseudo_masks
from samkd.features.schema import JoinLayout, StorageDtype, file_sha256, parts_dir
from samkd.features.storage import storage_errors
from samkd.features.writer import DATASET_OVERHEAD, to_numpy
from samkd.files import wait_for_paths
from samkd.models import (
    ENCODER_EMBED,
    AttentionCapture,
    available_taps,
    build_sam,
    build_teacher,
    capture_taps,
    check_weights_file,
)
from samkd.models.fast_attention import fast_teacher_enabled
from samkd.models.frames import SQUARE, Frame
from samkd.models.sam2_decoding import Sam2Features
from samkd.models.taps import ENCODER_HIGH_RES, is_sam2
from samkd.models.teacher import prompt_decoder_for
from samkd.runtime import (
    Distributed,
    device_for,
    init_distributed,
    input_image_size,
    progress_bar,
    resolve_device,
    resolve_precision,
    shutdown,
)
from samkd.settings import PseudoMaskSettings, Settings, TeacherSettings, model_frame


def preprocessing_of(image_size: int) -> dict[str, Any]:
    """Everything that decides a teacher's input pixels, recorded in the file."""
    return {
        "image_size": image_size,
        "resize": "longest_side",
        "pad": "bottom_right",
        "pixel_mean": list(SAM_PIXEL_MEAN),
        "pixel_std": list(SAM_PIXEL_STD),
    }


def check_taps(model: Sam, taps: list[str]) -> None:
    """Only encoder taps can be stored: decoder outputs depend on the prompts."""
    for tap in taps:
        if tap.startswith("decoder."):
            raise UsageError(
                f"extract.taps: '{tap}' depends on prompts and cannot be stored; training runs "
                "the stored teacher decoder on the stored encoder.embed instead"
            )
    valid = set(available_taps(model)) | {ENCODER_EMBED}
    unknown = [tap for tap in taps if tap not in valid]
    if unknown:
        encoder_taps = sorted(t for t in valid if t.startswith("encoder."))
        raise UsageError(
            f"extract.taps: unknown tap '{unknown[0]}'; valid taps: {', '.join(encoder_taps)}"
        )


@torch.inference_mode()
def teacher_tap_outputs(
    model: Sam, images: torch.Tensor, taps: list[str], grid_size: int
) -> dict[str, torch.Tensor]:
    """`{tap: B x ...}` on the model's device; attention taps as coarse `B x G² x G²` maps."""
    other_taps = [tap for tap in taps if tap != ENCODER_EMBED]
    with capture_taps(model, other_taps) as captured:
        embedding = model.image_encoder(images)
        values: dict[str, Any] = dict(captured)
    values[ENCODER_EMBED] = embedding
    outputs = {}
    for tap in taps:
        value = values[tap]
        if isinstance(value, AttentionCapture):
            value = coarse_attention_map(value, grid_size=grid_size)
        outputs[tap] = value
    return outputs


def teacher_batch_features(
    model: Sam, images: torch.Tensor, taps: list[str], grid_size: int
) -> dict[str, torch.Tensor]:
    """`{tap: B x ...}` float32 on the CPU, ready for the writer."""
    outputs = teacher_tap_outputs(model, images, taps, grid_size)
    return {tap: value.float().cpu() for tap, value in outputs.items()}


def batch_pseudo_masks(
    model: Sam,
    features: dict[str, torch.Tensor],
    original_sizes: Sequence[tuple[int, int]],
    dtype: StorageDtype,
    options: PseudoMaskSettings,
) -> list[list[dict[str, Any]]]:
    """Each image's pseudo-masks from its `encoder.embed` (`B x 256 x h x w`; a SAM 2
    teacher's also from its high-resolution maps) exactly as it is stored: cast to the storage
    `dtype` and back, so that the masks are those that the stored features give. The
    teacher's decoder runs on its own device."""
    device = model.device
    embeddings = as_stored(features[ENCODER_EMBED], dtype).to(device)
    inputs: Sequence[torch.Tensor | Sam2Features] = list(embeddings)
    if is_sam2(model):
        high_res = tuple(as_stored(features[tap], dtype).to(device) for tap in ENCODER_HIGH_RES)
        inputs = list(Sam2Features(embeddings, high_res))
    return [
        generate_pseudo_masks(model, embedding, size, options)
        for embedding, size in zip(inputs, original_sizes, strict=True)
    ]


def as_stored(values: torch.Tensor, dtype: StorageDtype) -> torch.Tensor:
    """`values` cast to the storage dtype and back to float32, as a reader sees them."""
    with np.errstate(over="ignore"):  # the writer refuses what overflows, unless allowed
        return torch.from_numpy(to_numpy(values).astype(dtype)).float()


def probe_tap_shapes(
    model_type: str, taps: list[str], image_size: int, grid_size: int
) -> dict[str, tuple[int, ...]]:
    """Per-image shape of each tap, from a forward on the meta device: no weights are
    initialised and nothing is computed, so planning a ViT-H costs milliseconds."""
    model = build_sam(model_type, image_size=image_size, device="meta")
    check_taps(model, taps)
    image = torch.zeros(1, 3, image_size, image_size, device="meta")
    outputs = teacher_tap_outputs(model, image, taps, grid_size)
    return {tap: tuple(value.shape[1:]) for tap, value in outputs.items()}


def decoder_bytes(model_type: str, image_size: int) -> int:
    """Bytes of one teacher's prompt encoder and mask decoder as stored (float32), each
    tensor an HDF5 dataset with its header."""
    decoder = prompt_decoder_for(model_type, image_size)
    tensors = [*decoder.parameters(), *decoder.buffers()]
    return sum(t.numel() * t.element_size() + DATASET_OVERHEAD for t in tensors)


def teacher_frame(entry: TeacherSettings) -> Frame:
    """The frame a teacher runs in (`teachers[i].frame`, auto: its own)."""
    return model_frame(entry.model_type, entry.frame)


def load_extraction_dataset(settings: Settings, image_size: int) -> SegmentationDataset:
    if settings.data.train is None:
        raise UsageError("no dataset to extract: pass --data FOLDER or set data.train")
    return build_dataset(
        settings.data.train,
        layout=settings.data.layout,
        annotation_file=settings.data.annotation_file,
        image_size=image_size,
        on_error=settings.data.on_error,
        max_objects=0,  # features need the pixels only
    )


def make_plan(
    settings: Settings, images: tuple[ImageRecord, ...], image_size: int, device: torch.device
) -> ExtractionPlan:
    """The extraction plan of `images`: tap shapes from a meta-device probe of each teacher."""
    tap_shapes = {
        entry.name: probe_tap_shapes(
            entry.model_type,
            teacher_taps(settings, entry),
            image_size,
            settings.extract.attention_grid,
        )
        for entry in settings.teachers
    }
    return plan_from_settings(
        settings,
        images,
        tap_shapes,
        preprocessing_of(image_size),
        image_size=image_size,
        compute=compute_of(settings, device),
        frames={entry.name: teacher_frame(entry) for entry in settings.teachers},
    )


def plan_images(
    settings: Settings, dataset: SegmentationDataset, dist: Distributed, console: Console
) -> tuple[ImageRecord, ...]:
    """The image index. Rank 0 builds it, hashing only the files new or changed since an
    earlier run; the other ranks read it from disk once rank 0 has published it and check
    the files of their own shards, so that no rank waits in a collective and none hashes
    what rank 0 hashes."""
    output = settings.extract.output
    paths = [record.image_path for record in dataset.records]
    ids = [record.image_id for record in dataset.records]
    progress = console_progress(console)
    if dist.is_main:
        checkpoints = None if output.exists() else parts_dir(output)
        describe = image_describer(settings.data.on_error)
        return index_images(paths, ids, known_images(output), checkpoints, progress, describe)
    console.print(f"rank {dist.rank}: reading rank 0's image index (published once hashed)")
    stored = wait_for_index(output)
    mine = rank_images(len(ids), settings.extract.shard_size, dist)
    difference = first_id_difference(stored, ids) or changed_image(
        stored, paths, mine, progress=progress
    )
    if difference is not None:
        started = output if output.exists() else parts_dir(output)
        raise FeatureStoreError(
            f"{output.name}: {difference} (use another output, or delete {started} to start over)"
        )
    return stored


def image_describer(on_error: OnError) -> Callable[[Path, str], ImageRecord]:
    """`describe_image_file` with the dataset's error policy: under "skip", a file that is
    not an image gets a 0 x 0 record (its bytes still hashed) instead of failing the index,
    and the extraction records it as skipped when it fails to load."""

    def describe(path: Path, image_id: str) -> ImageRecord:
        try:
            return describe_image_file(path, image_id)
        except DataError:
            if on_error == "raise" or not path.is_file():
                raise
        info = path.stat()
        return ImageRecord(image_id, 0, 0, file_sha256(path), info.st_size, info.st_mtime_ns)

    return describe


def rank_images(num_images: int, shard_size: int, dist: Distributed) -> list[int]:
    """The images of the shards this rank writes (see `ExtractionPlan.shards_of_rank`)."""
    num_shards = -(-num_images // shard_size)
    return [
        index
        for shard in range(dist.rank, num_shards, dist.world_size)
        for index in range(shard * shard_size, min((shard + 1) * shard_size, num_images))
    ]


def console_progress(console: Console) -> Progress:
    """A `samkd.features.images.Progress` that shows a rich progress bar on `console`."""

    @contextmanager
    def progress(description: str, total: int) -> Iterator[Callable[[int], None]]:
        with progress_bar(console=console) as bar:
            task = bar.add_task(description, total=total)
            yield lambda count: bar.advance(task, count)

    return progress


def compute_of(settings: Settings, device: torch.device) -> dict[str, str]:
    """How the teachers run on `device`, recorded in the file: a resumed extraction must not
    mix, say, bf16 fast-path features with float32 reference ones."""
    fast = fast_teacher_enabled(settings.extract.fast_teacher, device)
    return {
        "precision": resolve_precision(settings.extract.precision, device).name,
        "attention": "fused" if fast else "reference",
    }


@dataclass(frozen=True)
class Unreadable:
    """An image that failed to load, as a DataLoader worker passes it on (a DataError does
    not survive pickling: its constructor takes the path and the problem apart)."""

    index: int
    path: str
    problem: str


class ExtractionImages(Dataset[Sample | Unreadable]):
    """The images `indices` of `dataset`, each loaded on its own: a bad one gives an
    `Unreadable`, where `SegmentationDataset` under `on_error=skip` would load the next
    image in its place, so that every index gets its own features or its reason. In the
    `square` frame, a sample's `image` is its square input (`samkd.data.preprocess_square`)."""

    def __init__(
        self, dataset: SegmentationDataset, indices: Sequence[int], frame: Frame = "longest_side"
    ):
        self.dataset = copy.copy(dataset)
        # Features need the pixels only: no mask file is read, none can fail the image.
        self.dataset.records = [replace(record, mask_sources=()) for record in dataset.records]
        self.dataset.on_error, self.dataset.max_objects = "raise", 0
        self.dataset.square_inputs = frame == SQUARE
        self.indices = list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> Sample | Unreadable:
        index = self.indices[position]
        try:
            sample = self.dataset[index]
        except DataError as error:
            return Unreadable(index, str(error.path), error.problem)
        if sample.square_image is None:
            return sample
        size = self.dataset.image_size
        return replace(sample, image=sample.square_image, input_size=(size, size))


def collate_extraction(
    items: Sequence[Sample | Unreadable],
) -> tuple[SampleBatch | None, list[Unreadable]]:
    """The loaded samples as a batch (None if there is none), and the unreadable images."""
    samples = [item for item in items if isinstance(item, Sample)]
    unreadable = [item for item in items if isinstance(item, Unreadable)]
    return (collate_samples(samples) if samples else None), unreadable


def extract_teacher(
    writer: FeatureWriter,
    entry: TeacherSettings,
    dataset: SegmentationDataset,
    settings: Settings,
    image_size: int,
    device: torch.device,
    console: Console,
) -> None:
    """Compute and queue one teacher's features for the images this rank still lacks.

    An image that cannot be loaded stops the extraction (`data.on_error=raise`) or is
    recorded in the file as skipped (`skip`), keeping its row so that the index still
    matches the dataset's records. The teacher of `extract.pseudo_masks` also computes each
    image's pseudo-masks, from its embedding as stored (`batch_pseudo_masks`)."""
    todo = writer.todo(entry.name)
    if not todo:
        return
    fast = fast_teacher_enabled(settings.extract.fast_teacher, device)
    precision = resolve_precision(settings.extract.precision, device)
    frame = teacher_frame(entry)
    model = build_teacher(
        entry.model_type,
        image_size,
        entry.checkpoint,
        device,
        fast=fast,
        compile=settings.extract.compile,
        frame=frame,
    )
    writer.write_decoder_state(entry.name, model.state_dict())
    loader = DataLoader(
        ExtractionImages(dataset, todo, frame),
        batch_size=settings.extract.batch_size,
        num_workers=settings.data.num_workers,
        collate_fn=collate_extraction,
        pin_memory=device.type == "cuda",
    )
    pseudo = writer.plan.pseudo_mask_teacher == entry.name
    taps = teacher_taps(settings, entry)
    if pseudo and is_sam2(model):  # its generator takes them, whether stored or not
        taps += [tap for tap in ENCODER_HIGH_RES if tap not in taps]
    with progress_bar(console=console) as bar:
        task = bar.add_task(f"teacher {entry.name}", total=len(todo))
        for batch, unreadable in loader:
            if unreadable:
                reasons = [skip_reason(item, settings.data.on_error) for item in unreadable]
                writer.write_skipped(entry.name, [item.index for item in unreadable], reasons)
                bar.advance(task, len(unreadable))
            if batch is None:
                continue
            images = batch.images.to(device, non_blocking=True)
            with precision.autocast(device):
                features = teacher_batch_features(
                    model, images, taps, settings.extract.attention_grid
                )
            masks = None
            if pseudo:
                masks = batch_pseudo_masks(
                    model,
                    features,
                    batch.original_sizes,
                    writer.plan.dtype,
                    settings.extract.pseudo_masks,
                )
            writer.write_batch(entry.name, batch.indices, features, pseudo_masks=masks)
            bar.advance(task, len(batch.indices))


def skip_reason(item: Unreadable, on_error: OnError) -> str:
    """Why `item` is skipped (logged), or its DataError under `on_error=raise`."""
    return handle_error(DataError(item.path, item.problem), on_error, "image skipped")


def run_extract(settings: Settings, console: Console | None = None) -> Path | None:
    """Extract every teacher's features into `extract.output`; resumes an interrupted run.

    Under torchrun every rank writes its shards and leaves; rank 0 then leaves the process
    group too and joins the shards once all are on disk. Ranks only ever wait for each
    other's files, never in a collective: at SA-1B scale a rank waits longer than any
    collective timeout (NCCL's is 10 minutes) while rank 0 copies hundreds of GB. If a rank
    dies, torchrun stops the others; rerunning the command resumes (or only joins).

    Rank 0 holds the output's lock from start to join (`samkd.features.lock`): a second
    extraction of the same output stops at once. A full or read-only disk stops it with one
    line (`StorageError`), leaving no temporary file; a run that fails before finishing any
    shard removes the parts folder it made, which would refuse the corrected command.
    """
    console = console or Console(stderr=True)
    output = settings.extract.output
    dist = init_distributed(settings.extract.device)
    with ExitStack() as stack:
        stack.callback(shutdown, dist)
        stack.enter_context(storage_errors(output))
        if dist.is_main:
            stack.enter_context(output_lock(output, job_id()))
            stack.enter_context(removed_unless_computed(output))
        result = _extract(settings, dist, console)
        shutdown(dist)
        if result is None and dist.enabled and dist.is_main:
            result = join_when_complete(output, settings.extract.join, console)
    if result is not None:
        console.print(f"wrote {result} ({format_bytes(result.stat().st_size)} on disk)")
    return result


@contextmanager
def removed_unless_computed(output: Path) -> Iterator[None]:
    """On an error, delete the parts folder that the block made when no shard in it was
    finished: it holds only the failed run's plan, which would refuse the corrected
    command. An interruption (Ctrl-C) keeps it, to resume."""
    parts = parts_dir(output)
    existed = parts.exists()
    try:
        yield
    except Exception:
        if not existed and parts.is_dir() and not any(parts.glob("*/part-*.h5")):
            shutil.rmtree(parts, ignore_errors=True)
        raise


def _extract(settings: Settings, dist: Distributed, console: Console) -> Path | None:
    """This rank's shards; returns the output when it exists (joined here without torchrun)."""
    if not settings.teachers:
        raise UsageError("no teacher to extract: pass --teacher MODEL_TYPE or set teachers")
    device = device_for(dist, resolve_device(settings.extract.device))
    image_size = input_image_size(settings)
    dataset = load_extraction_dataset(settings, image_size)
    output = settings.extract.output
    if not dist.is_main and not rank_images(len(dataset), settings.extract.shard_size, dist):
        console.print(f"rank {dist.rank}: no shard to write ({len(dataset)} images)")
        return None
    check_teacher_weights(settings, image_size)  # before hashing the images: hours at scale
    images = plan_images(settings, dataset, dist, console)
    plan = make_plan(settings, images, image_size, device)
    sizes = [decoder_bytes(entry.model_type, image_size) for entry in settings.teachers]
    decoders = max(sizes)  # each teacher's at most
    masks = plan.pseudo_mask_teacher
    console.print(
        f"extracting {len(settings.teachers)} teacher(s) x {plan.num_images} images at "
        f"{image_size} px into {output} (planned {format_bytes(planned_bytes(plan))} of "
        f"features + {format_bytes(sum(sizes))} of teacher decoders)"
        + (f", with the pseudo-masks of teacher '{masks}'" if masks else "")
    )
    if not dist.is_main:
        wait_for_job(output, job_id())  # rank 0 holds the lock and removed stale files
    writer = open_for_extraction(
        output,
        plan,
        rank=dist.rank,
        world_size=dist.world_size,
        layout=settings.extract.join,
        decoder_bytes=decoders,
    )
    console.print(writer.message)
    with writer:
        for entry in settings.teachers:
            extract_teacher(writer, entry, dataset, settings, image_size, device, console)
        return writer.finish(join=not dist.enabled)


def check_teacher_weights(settings: Settings, image_size: int) -> None:
    """Raise the error that loading each teacher's checkpoint would raise later."""
    for entry in settings.teachers:
        if entry.checkpoint is not None:
            model = build_sam(entry.model_type, image_size=image_size, device="meta")
            check_weights_file(model, entry.checkpoint, entry.model_type)


def join_when_complete(
    output: Path, layout: JoinLayout, console: Console, poll_seconds: float = 5.0
) -> Path:
    """Rank 0, out of the process group: wait for the other ranks' shards, then join."""
    missing = missing_shards(output)
    if missing:
        console.print(f"{output.name}: waiting for {len(missing)} shards of the other ranks")
        with console_progress(console)("shards of the other ranks", len(missing)) as advance:
            wait_for_paths(missing, poll_seconds, on_found=advance)
    console.print(f"{output.name}: joining the shards ({layout})")
    return join_shards(output, layout=layout)
