"""Everything mode (`samkd eval --amg`) of the efficacy section's teacher and students:
recall of the ground-truth objects by automatic masks, their agreement with the teacher's,
and the time per image.

Needs the models of `python -m benchmarks --only efficacy` (in `.samkd-demo/efficacy/`,
which a full run makes first); `--quick` instead evaluates random tiny models on two
generated images, to check that the section runs.

    python -m benchmarks --only amg
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from rich.console import Console

from benchmarks.common import ResultTable, Section
from benchmarks.efficacy import FULL_CONFIG, ROWS, student_run
from samkd.demo.run import Paths
from samkd.demo.shapes import write_shapes_dataset
from samkd.errors import UsageError
from samkd.evaluate import run_eval
from samkd.settings import load_settings

NAME = "amg"
STUDENT_ROWS = ("a", "b", "d")
POINTS_PER_SIDE = 8
# SAM's filters keep none of the small teacher's masks (see the efficacy section): all are kept,
# de-duplicated by box NMS.
GENERATOR = [
    f"eval.amg.points_per_side={POINTS_PER_SIDE}",
    "eval.amg.pred_iou_thresh=0",
    "eval.amg.stability_score_thresh=0",
]
ONLY_AMG = ["eval.amg.enabled=true", "eval.prompts=[box]", "eval.multimask=false"]
TIME_NOTE = (
    "Recall and IoU do not depend on the machine; the times are absolute, on the machine above."
)
QUICK = ["eval.speed=false", "eval.device=cpu", "data.num_workers=0"]


def evaluate(config: Path | None, data: Path, *assignments: str) -> dict[str, Any]:
    """`samkd eval --amg --teacher teacher` of one student, as its JSON report."""
    settings = load_settings(
        config, [f"data.val={data}", *ONLY_AMG, *GENERATOR, *QUICK, *assignments], environ={}
    )
    return run_eval(settings, teacher="teacher", console=Console(quiet=True))


def efficacy_reports() -> tuple[Path, dict[str, dict[str, Any]]]:
    paths = Paths(FULL_CONFIG.work or Path())
    test = paths.root / "test-eval"
    reports = {}
    for row in STUDENT_ROWS:
        weights = student_run(paths, row, FULL_CONFIG.seeds[0]) / "student.pt"
        if not weights.is_file() or not test.is_dir():
            raise UsageError(f"{weights}: missing; run `python -m benchmarks --only efficacy`")
        reports[row] = evaluate(paths.student_config, test, f"student.checkpoint={weights}")
    return test, reports


def quick_reports() -> tuple[Path, dict[str, dict[str, Any]]]:
    with tempfile.TemporaryDirectory(prefix="samkd-amg-") as folder:
        data = write_shapes_dataset(Path(folder) / "shapes", 2, (64, 64))
        teacher = "teachers=[{name: teacher, model_type: vit_mini}]"
        tiny = ["student.model_type=vit_t_mini", "data.image_size=64", teacher]
        return data, {row: evaluate(None, data, *tiny) for row in STUDENT_ROWS}


def run(quick: bool) -> Section:
    data, reports = quick_reports() if quick else efficacy_reports()
    table = ResultTable(
        [
            "model",
            "masks / image",
            "s / image",
            "recall @ 0.5",
            "recall @ 0.75",
            "mean best IoU",
            "teacher masks matched",
            "matched IoU",
        ]
    )
    teacher = reports[STUDENT_ROWS[0]]["teacher_amg"]
    table.add("teacher (`vit_mini`)", *amg_cells(teacher), "", "")
    for row, report in reports.items():
        agreement = report["amg_agreement"]
        table.add(
            f"{row}. {ROWS[row][0]}",
            *amg_cells(report["amg"]),
            f"{agreement['matched_fraction']:.3f}",
            f"{agreement['mean_matched_iou']:.3f}",
        )
    return Section(
        NAME,
        "Everything mode: automatic masks of the efficacy models",
        (
            f"`samkd eval --amg --teacher teacher` on {teacher['images']} held-out test images "
            f"of the efficacy section, with its teacher and students {', '.join(STUDENT_ROWS)} "
            f"(seed {FULL_CONFIG.seeds[0]}): "
            "segment-anything's automatic mask generator through each model's own image "
            f"encoder, {POINTS_PER_SIDE}x{POINTS_PER_SIDE} points, no predicted-IoU or "
            "stability filter, box NMS 0.7, no crops. Recall: the share of ground-truth objects "
            "with an automatic mask of IoU at least 0.5 / 0.75; mean best IoU: over objects, the "
            "best IoU of any mask; matched: the share of the teacher's masks paired one to one "
            "with a student mask of IoU at least 0.5, and the mean IoU of the pairs. Time: "
            "generation per image (median), the image encoder included."
        ),
        [table],
        [TIME_NOTE],
    )


def amg_cells(summary: dict[str, Any]) -> list[str]:
    return [
        f"{summary['masks_per_image']:.1f}",
        f"{summary['seconds_per_image_median']:.2f}",
        f"{summary['recall_50']:.3f}",
        f"{summary['recall_75']:.3f}",
        f"{summary['mean_best_iou']:.3f}",
    ]
