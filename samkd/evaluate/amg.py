"""Everything mode (`samkd eval --amg`): automatic masks scored against every object.

    evaluation = evaluate_amg(dataset, model, settings.eval.amg, teacher=teacher)
    evaluation.model.summary()       # {"recall_50": 0.81, "mean_best_iou": 0.74, ...}
    evaluation.agreement.summary()   # {"matched_fraction": 0.9, "mean_matched_iou": 0.93, ...}

segment-anything's `SamAutomaticMaskGenerator` runs on each image at its original size,
through the model's own image encoder (a teacher stored in a feature file runs on its stored
embedding instead, without crops). Each ground-truth object scores the best IoU of any
generated mask; recall at t is the fraction of objects whose best IoU reaches t. A mask may
be the best of several objects: recall measures whether the objects are found, not how many
masks were spent. With a teacher, its masks and the model's are paired one to one, greedily
by IoU (at least `MATCH_IOU`): the fraction of teacher masks paired and their mean IoU.
"""

from __future__ import annotations

import importlib.util
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from rich.console import Console
from rich.table import Table
from segment_anything.modeling import Sam
from torch.utils.data import DataLoader

from samkd.data import Sample, SegmentationDataset
from samkd.data.dataset import load_record_image
from samkd.errors import UsageError
from samkd.evaluate.metrics import SIZE_NAMES, size_bucket
from samkd.evaluate.overlays import draw_masks, image_file_name, save_png, side_by_side, titled
from samkd.features import FeatureStore
from samkd.features.pseudo_masks import (
    build_mask_generator,
    decode_pseudo_masks,
    embedding_mask_generator,
)
from samkd.models import ENCODER_EMBED
from samkd.runtime import progress_bar
from samkd.settings import AmgSettings

# IoUs at which recall is reported (COCO's AR@0.5 and AR@0.75).
RECALL_THRESHOLDS = (0.5, 0.75)
# A model mask and a teacher mask of at least this IoU count as the same mask.
MATCH_IOU = 0.5

Rle = dict[str, Any]


@dataclass(frozen=True)
class GeneratedMasks:
    """One image's automatic masks: COCO RLEs at the original size, highest predicted IoU
    first, and the seconds generation took (the image encoder's included, unless a stored
    embedding stood in for it)."""

    rles: list[Rle]
    seconds: float


def check_amg_options(options: AmgSettings, stored_teacher: bool) -> None:
    """Refuse options that would fail only after the prompt evaluation."""
    if options.min_mask_region_area > 0 and importlib.util.find_spec("cv2") is None:
        raise UsageError(
            f"eval.amg.min_mask_region_area {options.min_mask_region_area} needs OpenCV "
            "(pip install opencv-python-headless); 0 turns the clean-up off"
        )
    if stored_teacher and options.crop_n_layers:
        raise UsageError(
            f"eval.amg.crop_n_layers {options.crop_n_layers} needs the teacher's image encoder, "
            "which --features does not store: use --teacher, or eval.amg.crop_n_layers=0"
        )


def generate_masks(
    model: Sam,
    image: np.ndarray,
    options: AmgSettings,
    embedding: torch.Tensor | None = None,
) -> GeneratedMasks:
    """The automatic masks of `image` (`H x W x 3` uint8 RGB); with `embedding`
    (`1 x 256 x h x w`, a stored teacher's) the image encoder does not run."""
    if embedding is None:
        generator = build_mask_generator(model, options)
    else:
        size = (image.shape[0], image.shape[1])
        generator = embedding_mask_generator(model, embedding, size, options)
    start = time.perf_counter()
    with torch.inference_mode():
        records = generator.generate(image)
    # The masks are host arrays by now, so an accelerator has finished its work.
    seconds = time.perf_counter() - start
    # With its filters off the generator may keep a mask of no pixels, which finds nothing.
    records = [record for record in records if record["area"] > 0]
    records.sort(key=lambda record: -record["predicted_iou"])  # stable: ties keep their order
    return GeneratedMasks([record["segmentation"] for record in records], seconds)


def encode_masks(masks: torch.Tensor) -> list[Rle]:
    """COCO RLEs of `N x H x W` bool masks."""
    if masks.shape[0] == 0:
        return []
    # pycocotools takes H x W x N, column-major.
    columns_first = np.asfortranarray(masks.numpy().transpose(1, 2, 0).astype(np.uint8))
    return list(mask_utils.encode(columns_first))


def pairwise_iou(first: Sequence[Rle], second: Sequence[Rle]) -> np.ndarray:
    """`M x N` IoUs of M and N COCO RLE masks of one image."""
    sizes = {tuple(int(side) for side in rle["size"]) for rle in (*first, *second)}
    if len(sizes) > 1:
        raise ValueError(f"masks of different sizes: {sorted(sizes)}")
    if not first or not second:
        return np.zeros((len(first), len(second)))
    not_crowd = [0] * len(second)
    return np.asarray(mask_utils.iou(list(first), list(second), not_crowd), dtype=np.float64)


def best_ious(ious: np.ndarray) -> np.ndarray:
    """`N` best IoU of each object of `ious` (`M generated x N objects`); 0 without masks."""
    if ious.shape[0] == 0:
        return np.zeros(ious.shape[1])
    return ious.max(axis=0)


def recall(best: np.ndarray, threshold: float) -> float | None:
    """Fraction of the objects whose best IoU (`N`) reaches `threshold`; None without objects."""
    return float((best >= threshold).mean()) if best.size else None


def match_masks(ious: np.ndarray, threshold: float = MATCH_IOU) -> list[tuple[int, int, float]]:
    """One-to-one pairs `(row, column, IoU)` of `ious` (`M x N`) of IoU at least `threshold`,
    chosen greedily, highest IoU first."""
    rows, columns = np.nonzero(ious >= threshold)
    order = np.argsort(-ious[rows, columns], kind="stable")
    taken_rows: set[int] = set()
    taken_columns: set[int] = set()
    pairs: list[tuple[int, int, float]] = []
    for row, column in zip(rows[order].tolist(), columns[order].tolist(), strict=True):
        if row in taken_rows or column in taken_columns:
            continue
        taken_rows.add(row)
        taken_columns.add(column)
        pairs.append((row, column, float(ious[row, column])))
    return pairs


def recall_key(threshold: float) -> str:
    """`recall_50` for 0.5: a JSON key without a dot."""
    return f"recall_{round(threshold * 100)}"


@dataclass
class AmgTable:
    """One model's automatic masks over a dataset: each object's best IoU and size class,
    and each image's number of masks and generation time."""

    best_ious: list[float] = field(default_factory=list)
    sizes: list[str] = field(default_factory=list)
    masks_per_image: list[int] = field(default_factory=list)
    seconds_per_image: list[float] = field(default_factory=list)

    def add_image(self, targets: list[Rle], areas: torch.Tensor, generated: GeneratedMasks) -> None:
        """Score one image's masks against its objects (`targets`, of `areas` (`N`) pixels)."""
        best = best_ious(pairwise_iou(generated.rles, targets))
        self.best_ious.extend(best.tolist())
        self.sizes.extend(size_bucket(int(area)) for area in areas.tolist())
        self.masks_per_image.append(len(generated.rles))
        self.seconds_per_image.append(generated.seconds)

    def best(self, size: str = "all") -> np.ndarray:
        """`N` best IoUs of the objects of a size class (or all)."""
        chosen = [
            iou
            for iou, name in zip(self.best_ious, self.sizes, strict=True)
            if size in ("all", name)
        ]
        return np.asarray(chosen, dtype=np.float64)

    def summary(self) -> dict[str, float | int | None]:
        """Recall at each of `RECALL_THRESHOLDS`, mean best IoU and object count, overall and
        by size (`..._small`); masks and seconds per image (mean, and median seconds)."""
        result: dict[str, float | int | None] = {
            "images": len(self.masks_per_image),
            "masks_per_image": _mean(self.masks_per_image),
            "seconds_per_image": _mean(self.seconds_per_image),
            "seconds_per_image_median": (
                statistics.median(self.seconds_per_image) if self.seconds_per_image else None
            ),
        }
        for size in ("all", *SIZE_NAMES):
            suffix = "" if size == "all" else f"_{size}"
            best = self.best(size)
            result[f"objects{suffix}"] = int(best.size)
            result[f"mean_best_iou{suffix}"] = float(best.mean()) if best.size else None
            for threshold in RECALL_THRESHOLDS:
                result[f"{recall_key(threshold)}{suffix}"] = recall(best, threshold)
        return result


@dataclass
class AmgAgreement:
    """How far the model's automatic masks are the teacher's: greedy one-to-one pairs of
    IoU at least `MATCH_IOU`, over all images."""

    model_masks: int = 0
    teacher_masks: int = 0
    matched_ious: list[float] = field(default_factory=list)

    def add_image(self, model: GeneratedMasks, teacher: GeneratedMasks) -> None:
        pairs = match_masks(pairwise_iou(model.rles, teacher.rles))
        self.model_masks += len(model.rles)
        self.teacher_masks += len(teacher.rles)
        self.matched_ious.extend(iou for _, _, iou in pairs)

    def summary(self) -> dict[str, float | int | None]:
        """Counts, the fraction of teacher (and model) masks matched, the mean matched IoU."""
        matched = len(self.matched_ious)
        return {
            "match_iou": MATCH_IOU,
            "model_masks": self.model_masks,
            "teacher_masks": self.teacher_masks,
            "matched": matched,
            "matched_fraction": matched / self.teacher_masks if self.teacher_masks else None,
            "model_matched_fraction": matched / self.model_masks if self.model_masks else None,
            "mean_matched_iou": _mean(self.matched_ious),
        }


@dataclass
class AmgEvaluation:
    """The model's table and, with a teacher, the teacher's and their agreement."""

    model: AmgTable = field(default_factory=AmgTable)
    teacher: AmgTable | None = None
    agreement: AmgAgreement | None = None

    @classmethod
    def empty(cls, with_teacher: bool) -> AmgEvaluation:
        """No images yet; with a teacher, its table and the agreement too."""
        if not with_teacher:
            return cls()
        return cls(teacher=AmgTable(), agreement=AmgAgreement())

    def add_image(
        self,
        targets: list[Rle],
        areas: torch.Tensor,
        generated: GeneratedMasks,
        teacher_generated: GeneratedMasks | None = None,
    ) -> None:
        """Score one image's masks (and the teacher's) against its objects (`targets`, of
        `areas` (`N`) pixels), and compare the two."""
        self.model.add_image(targets, areas, generated)
        if teacher_generated is None:
            return
        if self.teacher is None or self.agreement is None:
            raise ValueError("teacher masks given to an evaluation without a teacher")
        self.teacher.add_image(targets, areas, teacher_generated)
        self.agreement.add_image(generated, teacher_generated)

    def to_report(self) -> dict[str, Any]:
        """The `amg`, `teacher_amg` and `amg_agreement` entries of the eval report."""
        report: dict[str, Any] = {"amg": self.model.summary()}
        if self.teacher is not None and self.agreement is not None:
            report["teacher_amg"] = self.teacher.summary()
            report["amg_agreement"] = self.agreement.summary()
        return report


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _first(batch: list[Sample]) -> Sample:
    return batch[0]


def evaluate_amg(
    dataset: SegmentationDataset,
    model: Sam,
    options: AmgSettings,
    teacher: Sam | None = None,
    store: tuple[FeatureStore, str] | None = None,
    num_workers: int = 0,
    overlays_dir: Path | None = None,
    overlay_images: int = 8,
) -> AmgEvaluation:
    """Generate and score the automatic masks of every image of `dataset`.

    Arguments:
      model (Sam): the model evaluated; `teacher`, optionally, another one whose masks are
        scored the same way and compared with the model's.
      store: the feature file and teacher name whose stored embeddings `teacher` (a stored
        decoder, see `samkd.evaluate.run.stored_teacher`) runs on.
      overlays_dir: where a PNG of each of the first `overlay_images` images' masks goes
        (`<id>_amg.png`, the model's and the teacher's side by side).
    """
    check_amg_options(options, stored_teacher=store is not None)
    evaluation = AmgEvaluation.empty(with_teacher=teacher is not None)
    loader = DataLoader(dataset, batch_size=1, num_workers=num_workers, collate_fn=_first)
    with progress_bar() as progress:
        task = progress.add_task("automatic masks", total=len(dataset))
        for position, sample in enumerate(loader):
            record = dataset.records[sample.index]
            image = load_record_image(record, exif_transpose=dataset.exif_transpose)
            targets = encode_masks(sample.masks)
            areas = sample.masks.flatten(1).sum(dim=1)
            generated = generate_masks(model, image, options)
            shown = {"model": generated}
            teacher_generated = None
            if teacher is not None:
                embedding = None
                if store is not None:
                    features, name = store
                    stored = features.read(sample.image_id)[name][ENCODER_EMBED]
                    embedding = stored[None].to(teacher.device)
                teacher_generated = generate_masks(teacher, image, options, embedding)
                shown["teacher"] = teacher_generated
            evaluation.add_image(targets, areas, generated, teacher_generated)
            if overlays_dir is not None and position < overlay_images:
                panels = [
                    titled(
                        draw_masks(image, decode_pseudo_masks(masks.rles, sample.original_size)),
                        f"{sample.image_id}: {label}'s automatic masks",
                        f"{len(masks.rles)} masks",
                        legend="",
                    )
                    for label, masks in shown.items()
                ]
                name = image_file_name(sample.image_id, "_amg")
                save_png(side_by_side(panels), overlays_dir / name)
            progress.advance(task)
    return evaluation


def amg_table(labels: Sequence[str], summaries: Sequence[dict[str, Any]]) -> Table:
    """One column per model, one row per number: masks and time per image, recall, mean best
    IoU (overall and by size)."""
    shown = Table(title="automatic masks vs ground truth", title_justify="left")
    shown.add_column("")
    for label in labels:
        shown.add_column(label, justify="right")
    # (row label, summary key, scale, format)
    rows: list[tuple[str, str, float, str]] = [
        ("masks / image", "masks_per_image", 1.0, ".1f"),
        ("ms / image (median)", "seconds_per_image_median", 1000.0, ".1f"),
        *((f"recall @ IoU {t}", recall_key(t), 1.0, ".4f") for t in RECALL_THRESHOLDS),
        ("mean best IoU", "mean_best_iou", 1.0, ".4f"),
        ("objects", "objects", 1.0, ".0f"),
        *((f"mean best IoU {size}", f"mean_best_iou_{size}", 1.0, ".4f") for size in SIZE_NAMES),
    ]
    for label, key, scale, spec in rows:
        values = [summary[key] for summary in summaries]
        shown.add_row(label, *(_fmt(None if v is None else v * scale, spec) for v in values))
    return shown


def _fmt(value: float | None, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


def print_amg_report(report: dict[str, Any], console: Console) -> None:
    """The AMG entries of an eval report (`amg`, and `teacher_amg` / `amg_agreement`)."""
    labels = [report["model"]["model_type"]]
    summaries = [report["amg"]]
    if "teacher_amg" in report:
        labels.append(f"{report['teacher']['model_type']} (teacher)")
        summaries.append(report["teacher_amg"])
    console.print(amg_table(labels, summaries))
    agreement = report.get("amg_agreement")
    if agreement is not None:
        console.print(
            f"[bold]automatic masks vs teacher[/]: {_fmt(agreement['matched_fraction'], '.1%')} "
            f"of {agreement['teacher_masks']} teacher masks matched (IoU ≥ "
            f"{agreement['match_iou']}), mean matched IoU {_fmt(agreement['mean_matched_iou'])}"
        )
