"""`samkd eval`: mask quality with box and point prompts, agreement with a teacher, speed."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from loguru import logger
from rich.console import Console
from rich.table import Table
from segment_anything.modeling import Sam
from torch import nn
from torch.utils.data import DataLoader

from samkd import __version__
from samkd.data import Sample, SegmentationDataset, load_record_image, summarize_skipped
from samkd.errors import UsageError
from samkd.evaluate.amg import check_amg_options, evaluate_amg, print_amg_report
from samkd.evaluate.metrics import (
    EXTRA_METRICS,
    METRIC_TITLES,
    SIZE_NAMES,
    IoUTable,
    empty_mask_warning,
)
from samkd.evaluate.onnx_session import OnnxSam, measure_onnx_speed
from samkd.evaluate.overlays import draw_objects, image_file_name, save_png, side_by_side
from samkd.evaluate.predict import PromptableModel
from samkd.evaluate.quality import QualityOptions, QualityTables, ShownPrompts, evaluate_image
from samkd.evaluate.spec import ModelSpec, load_eval_dataset, student_spec, teacher_spec
from samkd.evaluate.speed import measure_speed
from samkd.features import FeatureStore, read_decoder_state_dict
from samkd.files import check_writable, write_json
from samkd.models import ENCODER_EMBED, PromptDecoder, build_teacher
from samkd.runtime import progress_bar, resolve_device
from samkd.settings import Settings


class StoredEmbeddings(nn.Module):
    """Stands in for a teacher's image encoder whose embeddings come from a feature file:
    it only tells `Sam` the input size."""

    def __init__(self, img_size: int) -> None:
        super().__init__()
        self.img_size = img_size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("this teacher's embeddings are read from the feature file")


def stored_teacher(
    features: Path, teacher: str | None, device: torch.device
) -> tuple[Sam, FeatureStore, str, str]:
    """A teacher made of its stored decoder, the store that holds its embeddings, and the
    teacher's name and model type."""
    store = FeatureStore(features, taps=[ENCODER_EMBED])
    names = [spec.name for spec in store.teachers]
    name = teacher or names[0]
    if name not in names:
        raise UsageError(f"{features}: no teacher '{name}' (has {', '.join(names)})")
    spec = next(spec for spec in store.teachers if spec.name == name)
    image_size = spec.image_size
    decoder = PromptDecoder(image_size)
    decoder.load_state_dict(read_decoder_state_dict(features, name), strict=True)
    model = Sam(StoredEmbeddings(image_size), decoder.prompt_encoder, decoder.mask_decoder)
    return model.to(device).eval(), store, name, spec.model_type


def _first(batch: list[Sample]) -> Sample:
    return batch[0]


@dataclass(frozen=True)
class Overlays:
    """`--overlays`: the folder, the most images drawn (`eval.overlay_images`), and the
    labels of the model and the teacher (None: no teacher)."""

    folder: Path
    images: int
    model: str
    teacher: str | None = None


def evaluate_quality(
    dataset: SegmentationDataset,
    model: PromptableModel,
    teacher: Sam | None,
    options: QualityOptions,
    num_workers: int,
    overlays: Overlays | None,
    store: tuple[FeatureStore, str] | None = None,
) -> tuple[QualityTables, list[str]]:
    """Run every image through the model(s); returns the tables and skipped-item messages.
    The first `overlays.images` images with objects are drawn (`save_overlay`)."""
    tables = QualityTables()
    skipped: list[str] = []
    drawn = 0
    loader = DataLoader(dataset, batch_size=1, num_workers=num_workers, collate_fn=_first)
    with progress_bar() as progress:
        task = progress.add_task("evaluating", total=len(dataset))
        for sample in loader:
            skipped.extend(sample.skipped)
            if sample.masks.shape[0]:
                stored = None
                if store is not None:
                    features, name = store
                    embedding = features.read(sample.image_id)[name][ENCODER_EMBED]
                    stored = embedding[None].to(model.device)
                shown = evaluate_image(
                    tables,
                    options,
                    sample.image,
                    sample.masks,
                    sample.original_size,
                    model,
                    teacher,
                    stored,
                )
                if overlays is not None and drawn < overlays.images:
                    save_overlay(dataset, sample, shown, overlays)
                    drawn += 1
            progress.advance(task)
    return tables, skipped


def save_overlay(
    dataset: SegmentationDataset, sample: Sample, shown: ShownPrompts, overlays: Overlays
) -> Path:
    """One PNG of the image (`<id>.png`): its objects as the first prompt kind measured
    shows them (`draw_objects`), the teacher's beside the model's."""
    record = dataset.records[sample.index]
    image = load_record_image(record, exif_transpose=dataset.exif_transpose)
    kind, (mine, theirs) = next(iter(shown.items()))
    panels = [
        draw_objects(
            image,
            sample.masks,
            mine.masks,
            mine.prompts,
            f"{sample.image_id}: {overlays.model}, {kind} prompts",
        )
    ]
    if theirs is not None:
        title = f"{sample.image_id}: {overlays.teacher}, {kind} prompts"
        panels.append(draw_objects(image, sample.masks, theirs.masks, theirs.prompts, title))
    path = overlays.folder / image_file_name(sample.image_id)
    save_png(side_by_side(panels), path)
    return path


def run_eval(
    settings: Settings,
    json_path: Path | None = None,
    overlays_dir: Path | None = None,
    teacher: str | None = None,
    features: Path | None = None,
    console: Console | None = None,
    onnx: Path | None = None,
) -> dict[str, Any]:
    """Evaluate the student and, with `teacher` (built) or `features` (its stored embeddings
    and decoder), a teacher; print tables; return all numbers.

    `onnx`: evaluate the pair that `samkd export` wrote there (see `OnnxFiles.of`) instead of
    the student's weights."""
    console = console or Console()
    # Before the evaluation, not after it: its results would be lost.
    if json_path is not None:
        check_writable(json_path.parent, "--json")
    if overlays_dir is not None:
        check_writable(overlays_dir, "--overlays")
    if settings.eval.amg.enabled:
        check_amg_options(settings.eval.amg, stored_teacher=features is not None)
    device = resolve_device(settings.eval.device)
    torch.manual_seed(settings.eval.seed)
    student = student_spec(settings)
    exported = None
    if onnx is not None:
        exported = OnnxSam.load(onnx)
        info = exported.info
        student = ModelSpec(f"onnx {info.precision}", info.model_type, onnx, info.image_size)
    dataset = load_eval_dataset(settings, student.image_size)
    model: PromptableModel = exported if exported is not None else student.build(device)
    teacher_model_spec, teacher_model, store = None, None, None
    if features is not None:
        teacher_model, feature_store, name, model_type = stored_teacher(features, teacher, device)
        store = (feature_store, name)
        stored_ids = set(feature_store.image_ids)
        missing = [r.image_id for r in dataset.records if r.image_id not in stored_ids]
        if missing:
            raise UsageError(
                f"{features}: no features for image '{missing[0]}' ({len(missing)} of "
                f"{len(dataset)} evaluation images); extract them with samkd extract --data "
                f"{settings.data.val or settings.data.train}"
            )
        stored_size = teacher_model.image_encoder.img_size
        teacher_model_spec = ModelSpec(
            f"teacher {name} (stored)", model_type, features, stored_size
        )
        if stored_size != student.image_size:
            raise UsageError(
                f"{features}: teacher '{name}' features are at {stored_size} px, the student "
                f"runs at {student.image_size} px"
            )
    elif teacher is not None:
        teacher_model_spec = teacher_spec(settings, teacher, student.image_size)
        spec = teacher_model_spec
        teacher_model = build_teacher(spec.model_type, spec.image_size, spec.checkpoint, device)
    options = QualityOptions(
        tuple(settings.eval.prompts), settings.eval.num_points, settings.eval.multimask
    )
    overlays = None
    if overlays_dir is not None:
        teacher_label = None if teacher_model_spec is None else teacher_model_spec.label
        overlays = Overlays(
            overlays_dir, settings.eval.overlay_images, model_label(student), teacher_label
        )
    tables, skipped = evaluate_quality(
        dataset, model, teacher_model, options, settings.data.num_workers, overlays, store
    )
    report: dict[str, Any] = {
        "samkd_version": __version__,
        "device": str(device),
        "dataset": {
            "root": str(settings.data.val or settings.data.train),
            "images": len(dataset),
            "objects": tables.model.count(options.prompt_names()[0], "single"),
            "skipped": sorted(set(skipped) | set(dataset.skipped)),
        },
        "model": student.to_dict(),
        "quality": tables.model.summary(),
    }
    if teacher_model_spec is not None:
        report["teacher"] = teacher_model_spec.to_dict()
        report["teacher_quality"] = tables.teacher.summary()
        report["agreement"] = tables.agreement.summary()
    if settings.eval.amg.enabled:
        amg = evaluate_amg(
            dataset,
            model,
            settings.eval.amg,
            teacher_model,
            store,
            settings.data.num_workers,
            overlays_dir,
            settings.eval.overlay_images,
        )
        report.update(amg.to_report())
    if settings.eval.speed:
        report["speed"] = {"model": _speed(model, settings)}
        if teacher_model is not None and store is None:
            report["speed"]["teacher"] = _speed(teacher_model, settings)
    report["settings"] = settings.model_dump(mode="json")
    print_report(report, tables, teacher_model_spec is not None, console)
    most_empty = tables.model.most_empty()
    if most_empty is not None and (warning := empty_mask_warning(most_empty[1], most_empty[0])):
        logger.warning(warning)
    if "amg" in report:
        print_amg_report(report, console)
    if skipped or dataset.skipped:
        logger.warning(summarize_skipped(list(skipped) + list(dataset.skipped)))
    if json_path is not None:
        write_json(report, json_path)
        console.print(f"wrote {json_path}")
    return report


def model_label(spec: ModelSpec) -> str:
    """How overlays name a model: its label and type, e.g. `student vit_t`."""
    return f"{spec.label} {spec.model_type}"


def _speed(model: PromptableModel, settings: Settings) -> dict[str, object]:
    if not isinstance(model, Sam):
        assert isinstance(model, OnnxSam)
        eval_settings = settings.eval
        return measure_onnx_speed(
            model, eval_settings.batch_size, eval_settings.warmup, eval_settings.repeats
        ).to_dict()
    return measure_speed(
        model, settings.eval.batch_size, settings.eval.warmup, settings.eval.repeats
    ).to_dict()


def _quality_tables(title: str, table: IoUTable) -> tuple[Table, Table]:
    """The means over objects and images, then mIoU by object size and the share of empty
    predicted masks: two tables, so that each fits an 80-column log."""
    extra_titles = [METRIC_TITLES[metric] for metric in EXTRA_METRICS]
    means = _table(title, ("objects", "mIoU", *extra_titles))
    by_size = _table(f"{title}: mIoU by size, empty masks", (*SIZE_NAMES, "empty"))
    for prompt, output in table.groups():
        extras = [_fmt(table.metric_mean(metric, prompt, output)) for metric in EXTRA_METRICS]
        count = str(table.count(prompt, output))
        means.add_row(prompt, output, count, _fmt(table.mean(prompt, output)), *extras)
        sizes = [_fmt(table.mean(prompt, output, size)) for size in SIZE_NAMES]
        empty = table.empty_fraction(prompt, output)
        by_size.add_row(prompt, output, *sizes, "-" if empty is None else f"{empty:.0%}")
    return means, by_size


def _table(title: str, number_columns: Sequence[str]) -> Table:
    shown = Table(title=title, title_justify="left")
    shown.add_column("prompt")
    shown.add_column("output")
    for column in number_columns:
        shown.add_column(column, justify="right")
    return shown


def _fmt(value: float | None) -> str:
    # Three decimals keep the table within 80 columns; --json has every digit.
    return "-" if value is None else f"{value:.3f}"


def print_report(
    report: dict[str, Any], tables: QualityTables, with_teacher: bool, console: Console
) -> None:
    model = report["model"]
    console.print(*_quality_tables(f"{model['model_type']} vs ground truth", tables.model))
    if with_teacher:
        teacher = report["teacher"]["model_type"]
        console.print(*_quality_tables(f"{teacher} (teacher) vs ground truth", tables.teacher))
        console.print(
            *_quality_tables(f"{model['model_type']} vs {teacher} masks", tables.agreement)
        )
    for name, speed in report.get("speed", {}).items():
        latency = speed["encoder_latency"]
        decoder = speed["decoder_latency_per_prompt"]
        console.print(
            f"[bold]{name} speed[/] on {speed['device']} at {speed['image_size']} px: "
            f"encoder {latency['median_s'] * 1000:.1f} ms median, "
            f"{latency['p90_s'] * 1000:.1f} ms p90; "
            f"{speed['encoder_images_per_s']:.2f} img/s at batch {speed['encoder_batch_size']}; "
            f"decoder {decoder['median_s'] * 1000:.2f} ms per prompt"
        )
