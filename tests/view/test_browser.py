"""`samkd view` in a real browser: the command serves the page, Chromium (driven by Playwright)
clicks on an object, and the page shows both models' masks and the IoU `samkd eval`'s code
computes for that click (and for a box); an upload gets masks without IoU; the run tab lists
every logged term and follows the log.

With SAMKD_SCREENSHOT_DIR set, the test looks at the CPU demo's models (`bash
scripts/demo.sh` first) and saves the README's screenshot there.
"""

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from samkd.data import build_dataset
from samkd.evaluate.prompts import box_prompts, center_point_prompts
from samkd.evaluate.quality import QualityOptions, QualityTables, evaluate_image
from samkd.models import build_sam
from samkd.train.metrics_log import read_metrics
from samkd.view.browser import chromium, click_pixel, find_chromium, serving

from .conftest import require, training_records, write_log

pytestmark = pytest.mark.browser

REPO_ROOT = Path(__file__).resolve().parents[2]
SCREENSHOTS = os.environ.get("SAMKD_SCREENSHOT_DIR")
DEMO = REPO_ROOT / ".samkd-demo"
WAIT_MS = 30_000
VIEWPORT = {"width": 1400, "height": 1250}


@dataclass(frozen=True)
class Served:
    url: str
    student_run: Path
    teacher_run: Path
    data: Path


def the_models(
    tmp_path: Path, student_run: Path, teacher_run: Path, shapes: Path
) -> tuple[Path, Path, Path]:
    """The student run (a copy: the test appends to its log), the teacher run and the data:
    the small random models, or the CPU demo's for the screenshot."""
    if SCREENSHOTS:
        if not (DEMO / "student-kd" / "student.pt").is_file():
            pytest.fail(
                f"SAMKD_SCREENSHOT_DIR shows the CPU demo's models: run {REPO_ROOT}/"
                "scripts/demo.sh first"
            )
        student_run, teacher_run, shapes = DEMO / "student-kd", DEMO / "teacher", DEMO / "data/test"
    copy = tmp_path / student_run.name
    shutil.copytree(student_run, copy, ignore=shutil.ignore_patterns("checkpoints", "tensorboard"))
    return copy, teacher_run, shapes


@pytest.fixture
def served(tmp_path: Path, student_run: Path, teacher_run: Path, shapes: Path) -> Iterator[Served]:
    """`samkd view STUDENT_RUN TEACHER_RUN --data SHAPES` serving on a free port, with one
    torch thread, as the reference computation below: the same sums in the same order."""
    require("gradio")
    student, teacher, data = the_models(tmp_path, student_run, teacher_run, shapes)
    arguments = [student, teacher, "--data", data]
    with serving(arguments, tmp_path / "server.log", cwd=REPO_ROOT, threads=1) as server:
        yield Served(server.url, student, teacher, data)


@pytest.fixture
def browser() -> Iterator[Any]:
    require("playwright")
    executable = find_chromium()
    require(executable=str(executable or "chromium"))
    assert executable is not None
    with chromium(executable) as opened:
        yield opened


def build_run_model(run: Path) -> torch.nn.Module:
    """The run's model built from its settings and weights, independently of the view."""
    settings = yaml.safe_load((run / "settings.yaml").read_text())
    model_type = settings["student"]["model_type"]
    size = settings["data"]["image_size"]
    return build_sam(model_type, image_size=size, checkpoint=run / "student.pt")


@dataclass(frozen=True)
class Expected:
    """`samkd eval`'s single-output IoUs of the largest object of image `index` (the first
    with two objects or more) for its `point` and `box` prompts, by model, and those
    prompts."""

    index: int
    target: int
    image_id: str
    width: int
    point: list[float]
    box: list[float]
    ious: dict[str, tuple[float, float]]


def eval_ious(served: Served) -> Expected:
    student, teacher = build_run_model(served.student_run), build_run_model(served.teacher_run)
    dataset = build_dataset(served.data, image_size=student.image_encoder.img_size)
    index = next(i for i in range(len(dataset)) if len(dataset.load_objects(i).masks) > 1)
    sample = dataset[index]
    tables = QualityTables()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        evaluate_image(
            tables,
            QualityOptions(("point", "box"), multimask=False),
            sample.image,
            sample.masks,
            sample.original_size,
            student,
            teacher,
        )
    finally:
        torch.set_num_threads(threads)
    target = int(sample.masks.flatten(1).sum(1).argmax())
    ious = {
        kind: (
            tables.model.values[(kind, "single", "all")][target],
            tables.teacher.values[(kind, "single", "all")][target],
        )
        for kind in ("point", "box")
    }
    point = center_point_prompts(sample.masks[target : target + 1]).point_coords
    box = box_prompts(sample.masks[target : target + 1]).boxes
    assert point is not None and box is not None
    return Expected(
        index,
        target,
        sample.image_id,
        sample.original_size[1],
        point[0, 0].tolist(),
        box[0].tolist(),
        ious,
    )


def shown_ious_equal(page: Any, expected: Expected, kind: str) -> None:
    """The page's IoU of each model is `samkd eval`'s for the prompt `kind`, to the last
    digit and as shown."""
    assert f"prompted object {expected.target + 1} " in page.inner_text("#view-summary")
    for model, value in enumerate(expected.ious[kind]):
        cell = page.locator(f"#view-results td[data-model='{model}'][data-field='iou']")
        assert float(cell.get_attribute("data-value")) == value
        assert cell.inner_text() == f"{value:.4f}"


def test_click_compare_and_follow_the_run(served: Served, browser: Any) -> None:
    expected = eval_ious(served)
    page = browser.new_page(viewport=VIEWPORT)
    outside: list[str] = []

    def note_outside(request: Any) -> None:
        if not request.url.startswith((served.url, "data:", "blob:")):
            outside.append(request.url)

    page.on("request", note_outside)
    page.goto(served.url)
    page.wait_for_selector("#view-canvas img", timeout=WAIT_MS)
    assert "image encoder (once per image)" in page.inner_text("#view-results")
    for _ in range(expected.index):
        page.click("#view-next")
    page.wait_for_function(
        f"document.querySelector('#view-summary')?.innerText.startsWith('{expected.image_id}:')"
    )

    # A positive click on the object's centre point: samkd eval's `point` prompt.
    click_pixel(page, "#view-canvas img", *expected.point, expected.width)
    page.wait_for_selector("#view-results-table[data-prompts='1']", timeout=WAIT_MS)
    shown_ious_equal(page, expected, "point")

    # Its box, drawn by two corners: samkd eval's `box` prompt.
    page.click("#view-clear")
    page.wait_for_selector("#view-results-table[data-prompts='0']", timeout=WAIT_MS)
    page.locator("#view-click-mode").get_by_text("box (two corners)").click()
    x0, y0, x1, y1 = expected.box
    click_pixel(page, "#view-canvas img", x0, y0, expected.width)
    page.wait_for_selector("#view-results-table[data-corner='1']", timeout=WAIT_MS)
    click_pixel(page, "#view-canvas img", x1, y1, expected.width)
    page.wait_for_selector("#view-results-table[data-prompts='1']", timeout=WAIT_MS)
    shown_ious_equal(page, expected, "box")

    # Both masks appear, at the canvas's size, and each model's three choices.
    canvas_width = page.locator("#view-canvas img").evaluate("element => element.naturalWidth")
    for selector in ("#view-panel-0 img", "#view-panel-1 img"):
        page.wait_for_function(f"document.querySelector('{selector}')?.complete")
        assert page.locator(selector).is_visible()
        assert page.locator(selector).evaluate("element => element.naturalWidth") == canvas_width
    for model in (0, 1):
        assert page.locator(f"#view-choices-{model} img").count() == 3
    if SCREENSHOTS:
        Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(SCREENSHOTS) / "view.jpg"), full_page=True, quality=85)

    # An uploaded picture has no ground truth: masks, but no IoU.
    picture = next((served.data / "image").iterdir())
    page.locator("#view-upload input[type=file]").set_input_files(str(picture))
    page.wait_for_function(
        "document.querySelector('#view-summary')?.innerText.includes('no ground truth')"
    )
    page.locator("#view-click-mode").get_by_text("positive point").click()
    click_pixel(page, "#view-canvas img", 10, 10, expected.width)
    page.wait_for_selector("#view-results-table[data-prompts='1']", timeout=WAIT_MS)
    assert page.locator("#view-results td[data-model='1'][data-field='iou']").inner_text() == "-"

    page.get_by_role("tab", name="Training run").click()
    page.wait_for_selector("#run-terms tr[data-term]", timeout=WAIT_MS)
    page.wait_for_selector("#run-curves img", timeout=WAIT_MS)
    assert sorted(listed_terms(page)) == logged_numbers(served.student_run)
    assert "model_type: vit_t_mini" in page.inner_text("#run-settings")

    # The run writes on: a new term appears without touching the page.
    write_log(served.student_run, [{**training_records(range(9, 10))[0], "kd/t/decoder_kl": 0.3}])
    page.wait_for_selector("#run-terms tr[data-term='kd/t/decoder_kl']", timeout=WAIT_MS)
    assert sorted(listed_terms(page)) == logged_numbers(served.student_run)
    assert outside == []


def listed_terms(page: Any) -> list[str]:
    rows = page.locator("#run-terms tr[data-term]")
    return [rows.nth(index).get_attribute("data-term") for index in range(rows.count())]


def logged_numbers(run: Path) -> list[str]:
    """Every name with a number in the run's log but the step and the epoch, sorted."""
    names = {
        name
        for record in read_metrics(run / "metrics.jsonl")
        for name, value in record.items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    } - {"step", "epoch"}
    return sorted(names)
