"""`samkd eval`: mask quality with box and point prompts, agreement with a teacher, speed."""

from __future__ import annotations

import json
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
from samkd.data import Sample, SegmentationDataset, build_dataset, load_rgb_image, summarize_skipped
from samkd.errors import UsageError
from samkd.evaluate.amg import check_amg_options, evaluate_amg, print_amg_report
from samkd.evaluate.metrics import EXTRA_METRICS, METRIC_TITLES, SIZE_NAMES, IoUTable
from samkd.evaluate.overlays import draw_overlay, save_png
from samkd.evaluate.predict import PromptableModel, model_inputs, stored_features
from samkd.evaluate.prompts import box_prompts
from samkd.evaluate.quality import QualityOptions, QualityTables, evaluate_image
from samkd.evaluate.speed import measure_speed
from samkd.features import FeatureStore, TeacherSpec, read_decoder_state_dict
from samkd.files import atomic_path, check_writable
from samkd.models import ENCODER_EMBED, build_sam, build_teacher
from samkd.models.frames import SQUARE
from samkd.models.taps import ENCODER_HIGH_RES, is_sam2
from samkd.models.teacher import prompt_decoder_for
from samkd.runtime import input_image_size, progress_bar, resolve_device
from samkd.settings import SAM2_MODEL_TYPES, Settings, TeacherSettings, model_frame

OVERLAY_IMAGES = 4


@dataclass(frozen=True)
class ModelSpec:
    """What to build: a registry type, optional weights, the input size and frame."""

    label: str
    model_type: str
    checkpoint: Path | None
    image_size: int
    frame: str = "longest_side"

    def build(self, device: torch.device) -> Sam:
        model = build_sam(self.model_type, image_size=self.image_size, checkpoint=self.checkpoint)
        if is_sam2(model):
            model.frame = self.frame
        return model.to(device).eval()

    def to_dict(self) -> dict[str, Any]:
        """The spec as reports give it; a SAM 2 model's with its frame."""
        spec = {
            "label": self.label,
            "model_type": self.model_type,
            "checkpoint": None if self.checkpoint is None else str(self.checkpoint),
            "image_size": self.image_size,
        }
        return spec | ({"frame": self.frame} if self.model_type in SAM2_MODEL_TYPES else {})


def student_spec(settings: Settings) -> ModelSpec:
    image_size = input_image_size(settings)
    student = settings.student
    frame = model_frame(student.model_type, student.frame)
    return ModelSpec("student", student.model_type, student.checkpoint, image_size, frame)


def teacher_spec(settings: Settings, teacher: str, image_size: int) -> ModelSpec:
    """The teacher named `teacher` in the settings, or a registry model type of that name."""
    for entry in settings.teachers:
        if entry.name == teacher:
            frame = model_frame(entry.model_type, entry.frame)
            return ModelSpec(
                f"teacher {entry.name}", entry.model_type, entry.checkpoint, image_size, frame
            )
    checked = TeacherSettings.model_validate({"name": teacher, "model_type": teacher})
    frame = model_frame(checked.model_type)
    return ModelSpec(f"teacher {teacher}", checked.model_type, None, image_size, frame)


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
) -> tuple[Sam, FeatureStore, str, TeacherSpec]:
    """A teacher made of its stored decoder, the store that holds its embeddings (a SAM 2
    teacher's also its high-resolution maps), and the teacher's stored description."""
    stored = FeatureStore(features).teachers
    names = [spec.name for spec in stored]
    name = teacher or names[0]
    if name not in names:
        raise UsageError(f"{features}: no teacher '{name}' (has {', '.join(names)})")
    spec = next(spec for spec in stored if spec.name == name)
    image_size = spec.image_size
    decoder = prompt_decoder_for(spec.model_type, image_size, spec.frame)  # type: ignore[arg-type]
    decoder.load_state_dict(read_decoder_state_dict(features, name), strict=True)
    if not is_sam2(decoder):
        model = Sam(StoredEmbeddings(image_size), decoder.prompt_encoder, decoder.mask_decoder)
        return model.to(device).eval(), FeatureStore(features, taps=[ENCODER_EMBED]), name, spec
    taps = [ENCODER_EMBED, *ENCODER_HIGH_RES]
    missing = [tap for tap in taps if tap not in spec.tap_names]
    if missing:
        raise UsageError(
            f"{features}: SAM 2 teacher '{name}' has no {missing[0]}, which its decoder takes; "
            "extract with --set extract.high_res=true"
        )
    store = FeatureStore(features, teachers=[name], taps=taps)
    return decoder.to(device).eval(), store, name, spec


def _first(batch: list[Sample]) -> Sample:
    return batch[0]


def load_eval_dataset(
    settings: Settings, image_size: int, square_inputs: bool = False
) -> SegmentationDataset:
    """The evaluation images; `square_inputs`: also in the square frame (SAM 2)."""
    root = settings.data.val or settings.data.train
    if root is None:
        raise UsageError("no dataset to evaluate: pass --data FOLDER or set data.val")
    dataset = build_dataset(
        root,
        layout=settings.data.layout,
        annotation_file=settings.data.annotation_file,
        image_size=image_size,
        on_error=settings.data.on_error,
        mask_threshold=settings.data.mask_threshold,
        seed=settings.eval.seed,
    )
    dataset.square_inputs = square_inputs
    return dataset


def evaluate_quality(
    dataset: SegmentationDataset,
    model: PromptableModel,
    teacher: Sam | None,
    options: QualityOptions,
    num_workers: int,
    overlays_dir: Path | None,
    store: tuple[FeatureStore, str] | None = None,
) -> tuple[QualityTables, list[str]]:
    """Run every image through the model(s); returns the tables and skipped-item messages."""
    tables = QualityTables()
    skipped: list[str] = []
    loader = DataLoader(dataset, batch_size=1, num_workers=num_workers, collate_fn=_first)
    with progress_bar() as progress:
        task = progress.add_task("evaluating", total=len(dataset))
        for position, sample in enumerate(loader):
            skipped.extend(sample.skipped)
            if sample.masks.shape[0]:
                stored = None
                if store is not None:
                    features, name = store
                    stored = stored_features(features, name, sample.image_id, model.device)
                teacher_image = None
                if teacher is not None and stored is None:
                    teacher_image = model_inputs(teacher, [sample])[0]
                shown = evaluate_image(
                    tables,
                    options,
                    model_inputs(model, [sample])[0],
                    sample.masks,
                    sample.original_size,
                    model,
                    teacher,
                    stored,
                    teacher_image,
                )
                if overlays_dir is not None and position < OVERLAY_IMAGES and "box" in shown:
                    _save_overlays(dataset, sample, shown["box"], overlays_dir)
            progress.advance(task)
    return tables, skipped


def _save_overlays(
    dataset: SegmentationDataset, sample: Sample, masks: torch.Tensor, folder: Path
) -> None:
    image = load_rgb_image(dataset.records[sample.index].image_path)
    boxes = box_prompts(sample.masks).boxes
    assert boxes is not None
    for number, (mask, target, box) in enumerate(zip(masks, sample.masks, boxes, strict=True)):
        picture = draw_overlay(image, mask, target, box)
        save_png(picture, folder / f"{sample.image_id}_obj{number}_box.png")


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
        sam2 = [settings.student.model_type] + ([teacher] if teacher in SAM2_MODEL_TYPES else [])
        check_amg_options(
            settings.eval.amg,
            stored_teacher=features is not None,
            sam2=[name for name in sam2 if name in SAM2_MODEL_TYPES],
        )
    device = resolve_device(settings.eval.device)
    torch.manual_seed(settings.eval.seed)
    student = student_spec(settings)
    exported = None
    if onnx is not None:
        from samkd.export import OnnxSam

        exported = OnnxSam.load(onnx)
        info = exported.info
        student = ModelSpec(f"onnx {info.precision}", info.model_type, onnx, info.image_size)
    teacher_model_spec, teacher_model, store = None, None, None
    if features is None and teacher is not None:
        teacher_model_spec = teacher_spec(settings, teacher, student.image_size)
    specs = (student, teacher_model_spec)
    square = any(spec is not None and spec.frame == SQUARE for spec in specs)
    dataset = load_eval_dataset(settings, student.image_size, square)
    model: PromptableModel = exported if exported is not None else student.build(device)
    if features is not None:
        teacher_model, feature_store, name, stored_spec = stored_teacher(features, teacher, device)
        model_type = stored_spec.model_type
        store = (feature_store, name)
        stored_ids = set(feature_store.image_ids)
        missing = [r.image_id for r in dataset.records if r.image_id not in stored_ids]
        if missing:
            raise UsageError(
                f"{features}: no features for image '{missing[0]}' ({len(missing)} of "
                f"{len(dataset)} evaluation images); extract them with samkd extract --data "
                f"{settings.data.val or settings.data.train}"
            )
        stored_size = stored_spec.image_size
        teacher_model_spec = ModelSpec(
            f"teacher {name} (stored)", model_type, features, stored_size, stored_spec.frame
        )
        if stored_size != student.image_size:
            raise UsageError(
                f"{features}: teacher '{name}' features are at {stored_size} px, the student "
                f"runs at {student.image_size} px"
            )
    elif teacher_model_spec is not None:
        spec = teacher_model_spec
        teacher_model = build_teacher(
            spec.model_type,
            spec.image_size,
            spec.checkpoint,
            device,
            frame=spec.frame,  # type: ignore[arg-type]
        )
    options = QualityOptions(
        tuple(settings.eval.prompts), settings.eval.num_points, settings.eval.multimask
    )
    tables, skipped = evaluate_quality(
        dataset, model, teacher_model, options, settings.data.num_workers, overlays_dir, store
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
        )
        report.update(amg.to_report())
    if settings.eval.speed:
        report["speed"] = {"model": _speed(model, settings)}
        if teacher_model is not None and store is None:
            report["speed"]["teacher"] = _speed(teacher_model, settings)
    report["settings"] = settings.model_dump(mode="json")
    print_report(report, tables, teacher_model_spec is not None, console)
    if "amg" in report:
        print_amg_report(report, console)
    if skipped or dataset.skipped:
        logger.warning(summarize_skipped(list(skipped) + list(dataset.skipped)))
    if json_path is not None:
        write_json(report, json_path)
        console.print(f"wrote {json_path}")
    return report


def _speed(model: PromptableModel, settings: Settings) -> dict[str, object]:
    if not isinstance(model, Sam) and not is_sam2(model):  # type: ignore[arg-type]
        from samkd.export import OnnxSam, measure_onnx_speed

        assert isinstance(model, OnnxSam)
        eval_settings = settings.eval
        return measure_onnx_speed(
            model, eval_settings.batch_size, eval_settings.warmup, eval_settings.repeats
        ).to_dict()
    return measure_speed(
        model, settings.eval.batch_size, settings.eval.warmup, settings.eval.repeats
    ).to_dict()


def write_json(report: dict[str, Any], path: Path) -> None:
    """Write `report` as JSON under a temporary name, then rename it into place."""
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(report, indent=2) + "\n")


def _quality_tables(title: str, table: IoUTable) -> tuple[Table, Table]:
    """The means over objects and images, then mIoU by object size: two tables, so that each
    fits an 80-column log."""
    extra_titles = [METRIC_TITLES[metric] for metric in EXTRA_METRICS]
    means = _table(title, ("objects", "mIoU", *extra_titles))
    by_size = _table(f"{title}: mIoU by size", SIZE_NAMES)
    for prompt, output in table.groups():
        extras = [_fmt(table.metric_mean(metric, prompt, output)) for metric in EXTRA_METRICS]
        count = str(table.count(prompt, output))
        means.add_row(prompt, output, count, _fmt(table.mean(prompt, output)), *extras)
        sizes = [_fmt(table.mean(prompt, output, size)) for size in SIZE_NAMES]
        by_size.add_row(prompt, output, *sizes)
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
