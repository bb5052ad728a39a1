"""Efficacy of label-free decoder distillation: the same student, steps and batches, with
ground truth on only a fifth of the training images.

The demo's generated shapes and models (`samkd.demo.run`), in their own folder
(`.samkd-demo/efficacy/`, cached between runs): a `vit_mini` teacher trained on every
training image with box and point prompts (so that it answers clicks), its features and
automatic masks extracted once (`samkd extract --pseudo-masks`), then five `vit_t_mini`
students, each starting from a random encoder and the teacher's prompt encoder and mask
decoder, all of which train:

    a. supervised only, every image labelled (lambda_kd 0);
    b. encoder distillation, 80% of the images without masks;
    c. b + decoder distillation on grid points of the unlabelled images (`points`);
    d. b + decoder distillation on the teacher's automatic masks (`teacher_masks`);
    e. d + the prompt loop (`train.prompt_iters: 3`).

Each is evaluated on held-out test images with box, centre-point and 3-click prompts.
Targets: c and d above b on box mIoU; e above d on 3-click mIoU.

    python -m benchmarks --only efficacy
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from benchmarks.common import ResultTable, Section
from samkd.data import build_dataset
from samkd.demo.run import (
    FAST,
    FULL,
    DemoSize,
    Paths,
    make_datasets,
    student_settings,
    teacher_settings,
    train_teacher,
    write_yaml,
)
from samkd.evaluate import run_eval
from samkd.extract import run_extract
from samkd.features import FeatureStore, FeatureStoreError
from samkd.features.pseudo_masks import decode_pseudo_masks
from samkd.settings import Settings, load_settings
from samkd.train import run_train

NAME = "efficacy"
LABELLED_EVERY = 5  # one image in five keeps its masks
PROMPTS = (("box", "single"), ("point", "best"), ("points-3", "single"))
DECODER = ["distillation.decoder.enabled=true"]


@dataclass(frozen=True)
class Config:
    size: DemoSize
    work: Path | None  # None: a temporary folder
    points_per_side: int


FULL_CONFIG = Config(
    dataclasses.replace(FULL, test_images=50, student_steps=80),
    Path(".samkd-demo/efficacy"),
    points_per_side=6,
)
QUICK_CONFIG = Config(FAST, None, points_per_side=4)
EVAL_IMAGES = 30  # the first of the test split: every evaluation then takes half a minute
# Box and point prompts (up to 3 positive points and a negative one), for every model: the
# 3-click evaluation needs decoders that have seen points.
PROMPTS_SETTINGS = {"mode": "mixed", "max_points": 3, "num_negative_points": 1}
# The students prompt at most 3 objects of an image, as many as ground truth has at most:
# rows c-e then decode as many prompts on an unlabelled image as on a labelled one, not 16.
STUDENT_PROMPTS = {**PROMPTS_SETTINGS, "max_objects": 3, "unlabelled_points": 3}
# SAM's filters (predicted IoU > 0.88, stability >= 0.95) keep no mask of the small teacher:
# its multimask IoU predictions sit near -0.1 and few of its logits pass the stability offset.
# Every mask is kept instead, de-duplicated by box NMS, the 16 highest-IoU ones per image.
KEEP_MASKS = [
    "extract.pseudo_masks.pred_iou_thresh=0",
    "extract.pseudo_masks.stability_score_thresh=0",
    "extract.pseudo_masks.max_masks=16",
]

ROWS: dict[str, tuple[str, list[str]]] = {
    "a": ("supervised only, all images labelled", ["distillation.dynamic_lambda.initial=0"]),
    "b": ("encoder KD, 80% unlabelled", []),
    "c": ("b + decoder KD on grid points", [*DECODER, "data.prompts.unlabelled=points"]),
    "d": ("b + decoder KD on teacher masks", [*DECODER, "data.prompts.unlabelled=teacher_masks"]),
    "e": (
        "d + prompt loop (3 iterations)",
        [*DECODER, "data.prompts.unlabelled=teacher_masks", "train.prompt_iters=3"],
    ),
}


def few_labelled_copy(train: Path, root: Path) -> Path:
    """A copy of a folder dataset in which only every `LABELLED_EVERY`-th image (by id) keeps
    its masks."""
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(train, root)
    ids = sorted(path.stem for path in (root / "image").glob("*.png"))
    for position, image_id in enumerate(ids):
        if position % LABELLED_EVERY:
            shutil.rmtree(root / "mask" / image_id, ignore_errors=True)
    return root


def first_images_copy(split: Path, root: Path, count: int) -> Path:
    """A copy of a folder dataset with its first `count` images (by id) and their masks."""
    shutil.rmtree(root, ignore_errors=True)
    for path in sorted((split / "image").glob("*.png"))[:count]:
        (root / "image").mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, root / "image" / path.name)
        if (split / "mask" / path.stem).is_dir():
            shutil.copytree(split / "mask" / path.stem, root / "mask" / path.stem)
    return root


def settings_of(config_file: Path, *assignments: str) -> Settings:
    return load_settings(config_file, list(assignments), environ={})


def extract_with_teacher_masks(paths: Paths, config: Config, output: Path) -> float | None:
    """Extract features and teacher masks into `output`; its seconds, or None when `output`
    already held them (an earlier run with the same plan: extraction then has nothing to do)."""
    settings = settings_of(
        paths.student_config,
        f"extract.output={output}",
        "extract.pseudo_masks.enabled=true",
        f"extract.pseudo_masks.points_per_side={config.points_per_side}",
        *KEEP_MASKS,
    )
    done = output.is_file()
    start = time.perf_counter()
    try:
        run_extract(settings, console=Console(quiet=True))
    except FeatureStoreError:  # made with other settings: start over
        shutil.rmtree(output.with_name(output.name + ".parts"), ignore_errors=True)
        output.unlink(missing_ok=True)
        done = False
        run_extract(settings, console=Console(quiet=True))
    return None if done else time.perf_counter() - start


def pseudo_mask_quality(features: Path, train: Path) -> tuple[float, float]:
    """Teacher masks per image, and the mean over ground-truth objects of the IoU of the
    best-matching teacher mask, over the training images (all of which have ground truth)."""
    dataset = build_dataset(train, layout="folder")
    store = FeatureStore(features)
    counts, best = [], []
    try:
        for index in range(len(dataset)):
            sample = dataset[index]
            masks = decode_pseudo_masks(store.pseudo_masks(sample.image_id), sample.original_size)
            counts.append(len(masks))
            for truth in sample.masks.numpy():
                ious = [(truth & mask).sum() / (truth | mask).sum() for mask in masks]
                best.append(max(ious, default=0.0))
    finally:
        store.close()
    return float(np.mean(counts)), float(np.mean(best)) if best else 0.0


def train_row(
    paths: Paths, row: str, extra: list[str], data: Path, features: Path
) -> tuple[Path, float]:
    run_dir = paths.root / f"student-{row}"
    shutil.rmtree(run_dir, ignore_errors=True)
    settings = settings_of(
        paths.student_config,
        f"data.train={data}",
        f"distillation.features={features}",
        f"train.output_dir={run_dir}",
        *extra,
    )
    start = time.perf_counter()
    run_train(settings, console=Console(quiet=True))
    return run_dir / "student.pt", time.perf_counter() - start


def evaluate_row(
    paths: Paths, test: Path, weights: Path, teacher: bool = False
) -> dict[str, float]:
    model = ["student.model_type=vit_mini", "student.decoder_from=null"] if teacher else []
    settings = settings_of(
        paths.student_config,
        *model,
        f"data.val={test}",
        f"student.checkpoint={weights}",
        "eval.prompts=[box, point, points]",
        "eval.num_points=3",
        "eval.multimask=true",
        "eval.speed=false",
        "eval.device=cpu",
    )
    report: dict[str, Any] = run_eval(settings, console=Console(quiet=True))
    return {prompt: report["quality"][prompt][output]["miou"] for prompt, output in PROMPTS}


def write_settings(paths: Paths, size: DemoSize) -> None:
    """The demo's teacher and student settings, with mixed prompts and a trainable student
    decoder; the students prompt at most as many objects an image as ground truth has."""
    teacher = teacher_settings(paths, size)
    teacher["data"]["prompts"] = PROMPTS_SETTINGS
    write_yaml(teacher, paths.teacher_config)
    student = student_settings(paths, size)
    student["data"]["prompts"] = STUDENT_PROMPTS
    student["train"]["frozen_until"] = {}
    write_yaml(student, paths.student_config)


def run(quick: bool) -> Section:
    config = QUICK_CONFIG if quick else FULL_CONFIG
    console = Console(stderr=True)
    temporary = tempfile.TemporaryDirectory(prefix="samkd-efficacy-")
    try:
        paths = Paths(config.work or Path(temporary.name))
        paths.root.mkdir(parents=True, exist_ok=True)
        make_datasets(paths, config.size, console)
        write_settings(paths, config.size)
        train_teacher(paths, console, [])
        few = few_labelled_copy(paths.split("train"), paths.root / "train-20pct")
        test = first_images_copy(paths.split("test"), paths.root / "test-eval", EVAL_IMAGES)
        features = paths.root / "features-with-masks.h5"
        extract_seconds = extract_with_teacher_masks(paths, config, features)
        quality = pseudo_mask_quality(features, paths.split("train"))
        table = ResultTable(
            ["row", "students", "box mIoU", "point mIoU (best of 3)", "3-click mIoU", "train s"]
        )
        results = {"teacher": evaluate_row(paths, test, paths.teacher_weights, teacher=True)}
        for row, (label, extra) in ROWS.items():
            data = paths.split("train") if row == "a" else few
            weights, seconds = train_row(paths, row, extra, data, features)
            results[row] = evaluate_row(paths, test, weights)
            console.print(f"{row}. {label}: {results[row]}")
            table.add(row, label, *(f"{results[row][p]:.3f}" for p, _ in PROMPTS), f"{seconds:.0f}")
        table.add(
            "", "teacher (`vit_mini`)", *(f"{results['teacher'][p]:.3f}" for p, _ in PROMPTS), ""
        )
        return Section(
            NAME,
            "Label-free decoder distillation: efficacy",
            description(config, extract_seconds, quality),
            [table],
            verdicts(results),
        )
    finally:
        temporary.cleanup()


def description(config: Config, extract_seconds: float | None, quality: tuple[float, float]) -> str:
    size = config.size
    per_image, best_iou = quality
    extraction = (
        "kept from an earlier run" if extract_seconds is None else f"{extract_seconds:.0f} s"
    )
    return (
        f"The CPU demo's data and models: {size.train_images} generated training images "
        f"({size.train_images // LABELLED_EVERY} keep their masks in rows b-e), "
        f"{min(EVAL_IMAGES, size.test_images)} held-out test images, {size.image_size} px. "
        "Teacher: "
        f"`vit_mini` trained on every training image with box and point prompts "
        f"({size.teacher_steps} steps). Students: `vit_t_mini`, a random encoder and the "
        f"teacher's prompt encoder and mask decoder, all trained, {size.student_steps} steps "
        f"of batch {size.batch_size} with box and point prompts, seed 0, the same batches in "
        "every row; encoder MSE in rows b-e, plus the decoder terms (MSE, cosine, KL) in c-e, "
        f"on at most {STUDENT_PROMPTS['max_objects']} objects (or "
        f"{STUDENT_PROMPTS['unlabelled_points']} grid points) an image. "
        "Teacher masks: segment-anything's automatic mask generator on the stored embeddings, "
        f"{config.points_per_side}x{config.points_per_side} points, no predicted-IoU or "
        f"stability filter (SAM's keep none of this teacher's masks), box NMS 0.7, at most 16 "
        f"per image (extraction with them: {extraction}): {per_image:.1f} masks per "
        f"image; the best-matching one has IoU {best_iou:.2f} with a ground-truth object, on "
        "average. Prompts at evaluation: the object's box (single-mask "
        "output), its centre point (best of the three multimask outputs against the ground "
        "truth) and 3 corrective clicks (single-mask output)."
    )


def verdicts(results: dict[str, dict[str, float]]) -> list[str]:
    def compare(row: str, other: str, prompt: str) -> str:
        gain = results[row][prompt] - results[other][prompt]
        met = "met" if gain > 0 else "missed"
        return f"{row} vs {other} on {prompt} mIoU: {gain:+.4f} ({met})"

    return [
        "Targets: "
        + "; ".join(
            [compare("c", "b", "box"), compare("d", "b", "box"), compare("e", "d", "points-3")]
        ),
    ]
