"""Efficacy of label-free decoder distillation: the same student, steps and batches, with
ground truth on only a fifth of the training images.

The demo's data and teacher (`samkd.demo.run`: generated shapes, a `vit_mini` teacher trained
on them, cached in `.samkd-demo/`), its features and automatic masks extracted once
(`samkd extract --pseudo-masks`), then five `vit_t_mini` students, each inheriting the
teacher's prompt encoder and mask decoder (frozen, MobileSAM's recipe):

    a. supervised only, every image labelled (lambda_kd 0);
    b. encoder distillation, 80% of the images without masks;
    c. b + decoder distillation on grid points of the unlabelled images (`points`);
    d. b + decoder distillation on the teacher's automatic masks (`teacher_masks`);
    e. d + the prompt loop (`train.prompt_iters: 3`).

Each is evaluated on the held-out test images with box, centre-point and 3-click prompts.
Targets: c and d above b on box mIoU; e above d on 3-click mIoU.

    python -m benchmarks --only efficacy
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from benchmarks.common import ResultTable, Section
from samkd.demo.run import (
    FAST,
    FULL,
    TEACHER_NAME,
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


FULL_CONFIG = Config(FULL, Path(".samkd-demo"), points_per_side=16)
QUICK_CONFIG = Config(FAST, None, points_per_side=4)

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


def settings_of(config_file: Path, *assignments: str) -> Settings:
    return load_settings(config_file, list(assignments), environ={})


def extract_with_teacher_masks(paths: Paths, config: Config, output: Path) -> None:
    shutil.rmtree(output.with_name(output.name + ".parts"), ignore_errors=True)
    output.unlink(missing_ok=True)
    settings = settings_of(
        paths.student_config,
        f"extract.output={output}",
        "extract.pseudo_masks.enabled=true",
        f"extract.pseudo_masks.points_per_side={config.points_per_side}",
    )
    run_extract(settings, console=Console(quiet=True))


def train_row(
    paths: Paths, row: str, extra: list[str], data: Path, features: Path, work: Path
) -> tuple[Path, float]:
    run_dir = work / f"student-{row}"
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


def evaluate_row(paths: Paths, weights: Path) -> dict[str, float]:
    settings = settings_of(
        paths.student_config,
        f"data.val={paths.split('test')}",
        f"student.checkpoint={weights}",
        "eval.prompts=[box, point, points]",
        "eval.num_points=3",
        "eval.multimask=true",
        "eval.speed=false",
        "eval.device=cpu",
    )
    report: dict[str, Any] = run_eval(settings, console=Console(quiet=True))
    return {prompt: report["quality"][prompt][output]["miou"] for prompt, output in PROMPTS}


def run(quick: bool) -> Section:
    config = QUICK_CONFIG if quick else FULL_CONFIG
    console = Console(stderr=True)
    temporary = tempfile.TemporaryDirectory(prefix="samkd-efficacy-")
    try:
        root = config.work or Path(temporary.name)
        paths = Paths(root)
        paths.root.mkdir(parents=True, exist_ok=True)
        make_datasets(paths, config.size, console)
        write_yaml(teacher_settings(paths, config.size), paths.teacher_config)
        write_yaml(student_settings(paths, config.size), paths.student_config)
        train_teacher(paths, console, [])
        work = root / "efficacy"
        work.mkdir(exist_ok=True)
        few = few_labelled_copy(paths.split("train"), work / "train-20pct")
        features = work / "features.h5"
        start = time.perf_counter()
        extract_with_teacher_masks(paths, config, features)
        extract_seconds = time.perf_counter() - start
        table = ResultTable(
            ["row", "students", "box mIoU", "point mIoU (best of 3)", "3-click mIoU", "train s"]
        )
        results = {}
        for row, (label, extra) in ROWS.items():
            data = paths.split("train") if row == "a" else few
            weights, seconds = train_row(paths, row, extra, data, features, work)
            results[row] = evaluate_row(paths, weights)
            console.print(f"{row}. {label}: {results[row]}")
            table.add(row, label, *(f"{results[row][p]:.3f}" for p, _ in PROMPTS), f"{seconds:.0f}")
        return Section(
            NAME,
            "Label-free decoder distillation: efficacy",
            description(config, extract_seconds),
            [table],
            verdicts(results),
        )
    finally:
        temporary.cleanup()


def description(config: Config, extract_seconds: float) -> str:
    size = config.size
    return (
        f"The CPU demo's setting: {size.train_images} generated training images "
        f"({size.train_images // LABELLED_EVERY} keep their masks in rows b-e), "
        f"{size.test_images} held-out test images, {size.image_size} px, the demo's "
        f"`vit_mini` teacher ('{TEACHER_NAME}'), `vit_t_mini` students inheriting its frozen "
        f"prompt encoder and mask decoder, {size.student_steps} steps of batch "
        f"{size.batch_size}, seed 0, the same batches in every row. Teacher masks: "
        f"segment-anything's automatic mask generator on the stored embeddings, "
        f"{config.points_per_side}x{config.points_per_side} points (extraction with them: "
        f"{extract_seconds:.0f} s). Prompts at evaluation: the object's box (single-mask "
        "output), its centre point (best of the three multimask outputs against the ground "
        "truth) and 3 corrective clicks (single-mask output)."
    )


def verdicts(results: dict[str, dict[str, float]]) -> list[str]:
    def compare(row: str, other: str, prompt: str) -> str:
        gain = results[row][prompt] - results[other][prompt]
        met = "met" if gain > 0 else "missed"
        return f"{row} vs {other} on {prompt} mIoU: {gain:+.3f} ({met})"

    return [
        "Targets: "
        + "; ".join(
            [compare("c", "b", "box"), compare("d", "b", "box"), compare("e", "d", "points-3")]
        ),
    ]
