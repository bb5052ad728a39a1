"""Efficacy of label-free decoder distillation: the same student, steps and batches, with
ground truth on only a fifth of the training images, over several seeds.

The demo's generated shapes and models (`samkd.demo.run`), in their own folder
(`.samkd-demo/efficacy/`): a `vit_mini` teacher trained on every training image with box and
point prompts (so that it answers clicks) by the code under test (cached only while its
settings, its data and the training code are unchanged), its features and automatic masks
extracted once (`samkd extract --pseudo-masks`), then five `vit_t_mini` students, each
starting from a random encoder and the teacher's prompt encoder and mask decoder, all of which
train:

    a. supervised only, every image labelled (lambda_kd 0);
    b. encoder distillation, 80% of the images without masks;
    c. b + decoder distillation on grid points of the unlabelled images (`points`);
    d. b + decoder distillation on the teacher's automatic masks (`teacher_masks`);
    e. d + the prompt loop (`train.prompt_iters: 3`);
    f. d + the teacher masks as targets of SAM's task loss too (`train.pseudo_mask_weight: 0.5`).

Each row trains once per seed (`train.seed`: the student's initialisation, the batch order and
the prompts) and is evaluated on held-out test images with box, centre-point and 3-click
prompts. Targets, judged on the mean over seeds and met only when the gain exceeds the spread:
c and d above b on box mIoU; e above d on 3-click mIoU. Every training and evaluation runs in
its own process on one thread, so the numbers do not depend on the machine's core count; the
processes run side by side, one per core.

    python -m benchmarks --only efficacy
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import shutil
import statistics
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

from benchmarks.common import ResultTable, Section, usable_cores
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
# (column, eval prompt, output): box and 3 clicks with the single-mask output, the centre
# click with the best of the three multimask outputs and with the single-mask output.
MEASURES = (
    ("box", "box", "single"),
    ("point (best of 3)", "point", "best"),
    ("point (single)", "point", "single"),
    ("3-click", "points-3", "single"),
)
DECODER = ["distillation.decoder.enabled=true"]


@dataclass(frozen=True)
class Config:
    size: DemoSize
    work: Path | None  # None: a temporary folder
    points_per_side: int
    seeds: tuple[int, ...]
    eval_images: int  # the first of the test split


FULL_CONFIG = Config(
    dataclasses.replace(FULL, test_images=50, student_steps=80),
    Path(".samkd-demo/efficacy"),
    points_per_side=6,
    seeds=(0, 1, 2),
    eval_images=30,
)
QUICK_CONFIG = Config(FAST, None, points_per_side=4, seeds=(0, 1), eval_images=3)
# Boxes, or 1-3 positive points (one of them alone: a single click, which trains the multimask
# outputs; two or three with a negative point), for every model: the 3-click evaluation needs
# decoders that have seen several points.
PROMPTS_SETTINGS = {"mode": "mixed", "max_points": 3, "num_negative_points": 1}
# Teacher and students train from a decoder whose multimask outputs start untrained: a tenth of
# a single click's loss goes to the two outputs it does not pick, so that all three learn.
OTHER_OUTPUTS = 0.1
# The students prompt at most 3 objects of an image, as many as ground truth has at most:
# rows c-f then decode as many prompts on an unlabelled image as on a labelled one, not 16.
STUDENT_PROMPTS = {**PROMPTS_SETTINGS, "max_objects": 3, "unlabelled_points": 3}
# SAM's filters (predicted IoU > 0.88, stability >= 0.95) keep few masks of the small teacher:
# every mask is kept instead, de-duplicated by box NMS, the 16 highest-IoU ones per image.
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
    "f": (
        "d + teacher masks as task-loss targets (weight 0.5)",
        [*DECODER, "data.prompts.unlabelled=teacher_masks", "train.pseudo_mask_weight=0.5"],
    ),
}
TEACHER_ROW = "teacher"


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


def student_run(paths: Paths, row: str, seed: int) -> Path:
    """The run folder of `row` trained with `seed`."""
    return paths.root / f"student-{row}-seed{seed}"


def settings_of(config_file: Path, *assignments: str) -> Settings:
    return load_settings(config_file, list(assignments), environ={})


def extract_with_teacher_masks(paths: Paths, config: Config, output: Path) -> float | None:
    """Extract features and teacher masks into `output`; its seconds, or None when `output`
    already held them (an earlier run with the same plan and teacher: the feature file's
    checks then leave extraction nothing to do)."""
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
    except FeatureStoreError:  # made with other settings or another teacher: start over
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


# --------------------------------------------------------------------------- jobs


@dataclass(frozen=True)
class Inputs:
    """What every job reads: the settings file, training data, features and test images."""

    student_config: Path
    teacher_weights: Path
    labelled: Path  # every image with its masks (row a)
    few_labelled: Path  # a fifth of them (rows b-f)
    features: Path
    test: Path


@dataclass(frozen=True)
class Job:
    """One row trained with one seed and evaluated, or the teacher evaluated (`seed` None)."""

    row: str
    seed: int | None
    run_dir: Path


@dataclass(frozen=True)
class Scores:
    job: Job
    miou: dict[str, float]  # by MEASURES column
    train_seconds: float


def run_job(job: Job, inputs: Inputs) -> Scores:
    """Train (rows) and evaluate one model on one thread, in a process of its own."""
    torch.set_num_threads(1)
    if job.seed is None:
        return Scores(job, evaluate(inputs, inputs.teacher_weights, teacher=True), 0.0)
    shutil.rmtree(job.run_dir, ignore_errors=True)
    settings = settings_of(
        inputs.student_config,
        f"data.train={inputs.labelled if job.row == 'a' else inputs.few_labelled}",
        f"distillation.features={inputs.features}",
        f"train.output_dir={job.run_dir}",
        f"train.seed={job.seed}",
        "data.num_workers=0",
        *ROWS[job.row][1],
    )
    start = time.perf_counter()
    run_train(settings, console=Console(quiet=True))
    seconds = time.perf_counter() - start
    return Scores(job, evaluate(inputs, job.run_dir / "student.pt"), seconds)


def evaluate(inputs: Inputs, weights: Path, teacher: bool = False) -> dict[str, float]:
    model = ["student.model_type=vit_mini", "student.decoder_from=null"] if teacher else []
    settings = settings_of(
        inputs.student_config,
        *model,
        f"data.val={inputs.test}",
        f"student.checkpoint={weights}",
        "eval.prompts=[box, point, points]",
        "eval.num_points=3",
        "eval.multimask=true",
        "eval.speed=false",
        "eval.device=cpu",
    )
    report: dict[str, Any] = run_eval(settings, console=Console(quiet=True))
    quality = report["quality"]
    return {column: quality[prompt][output]["miou"] for column, prompt, output in MEASURES}


def run_jobs(jobs: Sequence[Job], inputs: Inputs, console: Console) -> list[Scores]:
    """Every job, one process per core; each prints a line when it ends."""
    workers = max(1, min(usable_cores(), len(jobs)))
    context = multiprocessing.get_context("spawn")  # no threads or locks inherited
    results = []
    began = time.perf_counter()
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        futures = [pool.submit(run_job, job, inputs) for job in jobs]
        for done, future in enumerate(as_completed(futures), start=1):
            scores = future.result()
            results.append(scores)
            job = scores.job
            label = job.row if job.seed is None else f"{job.row} (seed {job.seed})"
            numbers = ", ".join(f"{name} {value:.3f}" for name, value in scores.miou.items())
            elapsed = time.perf_counter() - began
            console.print(f"[{done}/{len(jobs)}, {elapsed:.0f} s] {label}: {numbers}")
    return results


# --------------------------------------------------------------------------- the section


def write_settings(paths: Paths, size: DemoSize) -> None:
    """The demo's teacher and student settings, with mixed prompts and a trainable student
    decoder; the students prompt at most as many objects an image as ground truth has."""
    teacher = teacher_settings(paths, size)
    teacher["data"]["prompts"] = PROMPTS_SETTINGS
    teacher["train"]["task_loss_weights"] = {"other_outputs": OTHER_OUTPUTS}
    write_yaml(teacher, paths.teacher_config)
    student = student_settings(paths, size)
    student["data"]["prompts"] = STUDENT_PROMPTS
    student["train"]["frozen_until"] = {}
    student["train"]["task_loss_weights"] = {"other_outputs": OTHER_OUTPUTS}
    write_yaml(student, paths.student_config)


def prepare(paths: Paths, config: Config, console: Console) -> tuple[Inputs, dict[str, Any]]:
    """Data, teacher, features and teacher masks; what each took."""
    paths.root.mkdir(parents=True, exist_ok=True)
    make_datasets(paths, config.size, console)
    write_settings(paths, config.size)
    start = time.perf_counter()
    trained = train_teacher(paths, console, [])
    teacher_seconds = time.perf_counter() - start if trained else None
    inputs = Inputs(
        student_config=paths.student_config,
        teacher_weights=paths.teacher_weights,
        labelled=paths.split("train"),
        few_labelled=few_labelled_copy(paths.split("train"), paths.root / "train-20pct"),
        features=paths.root / "features-with-masks.h5",
        test=first_images_copy(paths.split("test"), paths.root / "test-eval", config.eval_images),
    )
    extract_seconds = extract_with_teacher_masks(paths, config, inputs.features)
    facts = {
        "teacher_seconds": teacher_seconds,
        "extract_seconds": extract_seconds,
        "pseudo_masks": pseudo_mask_quality(inputs.features, paths.split("train")),
    }
    return inputs, facts


def run(quick: bool) -> Section:
    config = QUICK_CONFIG if quick else FULL_CONFIG
    console = Console(stderr=True)
    temporary = tempfile.TemporaryDirectory(prefix="samkd-efficacy-")
    try:
        paths = Paths((config.work or Path(temporary.name)).resolve())
        inputs, facts = prepare(paths, config, console)
        jobs = [Job(TEACHER_ROW, None, paths.teacher_run)]
        jobs += [
            Job(row, seed, student_run(paths, row, seed)) for seed in config.seeds for row in ROWS
        ]
        results = run_jobs(jobs, inputs, console)
        by_row: dict[str, list[Scores]] = {}
        for scores in sorted(results, key=lambda s: (s.job.row, s.job.seed or 0)):
            by_row.setdefault(scores.job.row, []).append(scores)
        return Section(
            NAME,
            "Label-free decoder distillation: efficacy",
            description(config, facts),
            [summary_table(by_row, config.seeds), seed_table(by_row)],
            verdicts(by_row),
        )
    finally:
        temporary.cleanup()


# --------------------------------------------------------------------------- tables


def mean_and_spread(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return statistics.fmean(values), spread


def column_stats(scores: Sequence[Scores], column: str) -> tuple[float, float]:
    return mean_and_spread([s.miou[column] for s in scores])


def summary_table(by_row: dict[str, list[Scores]], seeds: Sequence[int]) -> ResultTable:
    columns = [name for name, _, _ in MEASURES]
    table = ResultTable(
        ["row", "students", *(f"{name} mIoU" for name in columns)]
        + ["box / a", "3-click / a", "train s"],
        title=f"mean ± standard deviation over seeds {', '.join(map(str, seeds))}",
    )
    reference = {name: column_stats(by_row["a"], name)[0] for name in ("box", "3-click")}
    for row, (label, _) in ROWS.items():
        stats = [column_stats(by_row[row], name) for name in columns]
        cells = [f"{mean:.3f} ± {spread:.3f}" for mean, spread in stats]
        ratios = [
            share(column_stats(by_row[row], name)[0], reference[name])
            for name in ("box", "3-click")
        ]
        seconds = statistics.fmean(s.train_seconds for s in by_row[row])
        table.add(row, label, *cells, *ratios, f"{seconds:.0f}")
    teacher = by_row[TEACHER_ROW][0].miou
    table.add("", "teacher (`vit_mini`)", *(f"{teacher[name]:.3f}" for name in columns), "", "", "")
    return table


def share(value: float, reference: float) -> str:
    return f"{value / reference:.2f}" if reference > 0 else "n/a"


def seed_table(by_row: dict[str, list[Scores]]) -> ResultTable:
    columns = [name for name, _, _ in MEASURES]
    table = ResultTable(["row", "seed", *columns], title="every run")
    for row in ROWS:
        for scores in by_row[row]:
            table.add(row, scores.job.seed, *(f"{scores.miou[name]:.3f}" for name in columns))
    return table


def description(config: Config, facts: dict[str, Any]) -> str:
    size = config.size
    per_image, best_iou = facts["pseudo_masks"]
    extraction = facts["extract_seconds"]
    extraction_text = "kept from an earlier run" if extraction is None else f"{extraction:.0f} s"
    teacher = facts["teacher_seconds"]
    teacher_text = (
        "kept from an earlier run of the same code and settings"
        if teacher is None
        else f"trained in this run, {teacher:.0f} s"
    )
    return (
        f"The CPU demo's data and models: {size.train_images} generated training images "
        f"({size.train_images // LABELLED_EVERY} keep their masks in rows b-f), "
        f"{min(config.eval_images, size.test_images)} held-out test images, "
        f"{size.image_size} px. Teacher: `vit_mini` trained on every training image with box "
        f"and point prompts ({size.teacher_steps} steps; {teacher_text}). Students: "
        f"`vit_t_mini`, a random encoder and the teacher's prompt encoder and mask decoder, all "
        f"trained, {size.student_steps} steps of batch {size.batch_size} with box and point "
        f"prompts (boxes, single clicks, or 2-3 points and a negative one), "
        f"{OTHER_OUTPUTS:g} of a single click's mask loss on the two multimask outputs it does "
        "not pick (`train.task_loss_weights.other_outputs`), the same batches in "
        "every row of a seed; encoder MSE in rows b-f, plus the decoder terms (MSE, cosine, "
        f"KL) in c-f, on at most {STUDENT_PROMPTS['max_objects']} objects (or "
        f"{STUDENT_PROMPTS['unlabelled_points']} grid points) an image. Each row runs with seeds "
        f"{', '.join(map(str, config.seeds))} (`train.seed`: initialisation, batch order, "
        "prompts), each training and evaluation in a process of its own on one thread. "
        "Teacher masks: segment-anything's automatic mask generator on the stored embeddings, "
        f"{config.points_per_side}x{config.points_per_side} points, no predicted-IoU or "
        f"stability filter, box NMS 0.7, at most 16 per image (extraction with them: "
        f"{extraction_text}): {per_image:.1f} masks per image; the best-matching one has IoU "
        f"{best_iou:.2f} with a ground-truth object, on average. Prompts at evaluation: the "
        "object's box (single-mask output), its centre point (the best of the three multimask "
        "outputs against the ground truth, and the single-mask output) and 3 corrective clicks "
        "(single-mask output). `x / a`: the row's mean over row a's. Rows e and f each differ "
        "from row d in one setting (the prompt loop; the teacher masks as task-loss targets): "
        "their gaps over row d are what that setting moved."
    )


def compare(by_row: dict[str, list[Scores]], row: str, other: str, column: str) -> str:
    """The mean gain of `row` over `other` on `column`, met only when it exceeds the larger of
    the two rows' standard deviations."""
    mean, spread = column_stats(by_row[row], column)
    other_mean, other_spread = column_stats(by_row[other], column)
    gain, noise = mean - other_mean, max(spread, other_spread)
    if gain <= 0:
        verdict = "missed"
    elif gain > noise:
        verdict = "met"
    else:
        verdict = "not met: within the spread"
    return f"{row} vs {other} on {column} mIoU: {gain:+.3f} (spread {noise:.3f}, {verdict})"


def verdicts(by_row: dict[str, list[Scores]]) -> list[str]:
    targets = [
        compare(by_row, "c", "b", "box"),
        compare(by_row, "d", "b", "box"),
        compare(by_row, "e", "d", "3-click"),
    ]
    label_free = [row for row in ROWS if row != "a"]
    goals = []
    for column in ("box", "3-click"):
        reference = column_stats(by_row["a"], column)[0]
        best = max(label_free, key=lambda row: column_stats(by_row[row], column)[0])
        mean = column_stats(by_row[best], column)[0]
        met = "met" if reference > 0 and mean >= 0.95 * reference else "not met"
        goals.append(f"{column}: row {best} at {share(mean, reference)} of row a ({met})")
    teacher = by_row[TEACHER_ROW][0].miou
    single_click = (
        f"the teacher's centre click: best of 3 {teacher['point (best of 3)']:.3f}, single "
        f"output {teacher['point (single)']:.3f}"
    )
    return [
        "Targets: " + "; ".join(targets),
        "Goal, the best label-free row at 95% of row a: " + "; ".join(goals),
        single_click.capitalize(),
    ]
