"""`samkd view` with the CPU demo's models (the `vit_t_mini` student and the `vit_mini`
teacher at 128 px, the demo's 100 test images of 192 x 256): the command's start-up until the
page answers, the answer to a click (both mask decoders and the drawing) in the process and
in Chromium, and the run tab's refresh.

The demo's trained runs in `.samkd-demo/` are used when they exist (`bash scripts/demo.sh`);
else the same models with random weights, which cost the same. `--quick`: 64 px models on
3 images.

    python -m benchmarks --only view
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.common import NOISE_NOTE, ResultTable, Section
from samkd.demo.run import FULL, STUDENT_TYPE, TEACHER_TYPE, Paths
from samkd.demo.shapes import write_shapes_dataset
from samkd.evaluate.prompts import center_point_prompts
from samkd.models import build_sam, save_state_dict
from samkd.settings import load_settings
from samkd.view.browser import chromium, click_pixel, find_chromium, serving
from samkd.view.images import DatasetImages
from samkd.view.predictor import Predictor
from samkd.view.runs import read_run
from samkd.view.sources import load_model, model_sources
from samkd.view.viewer import POSITIVE_POINT, Viewer

NAME = "view"
DEMO = Path(__file__).resolve().parents[1] / ".samkd-demo"
WAIT_MS = 60_000


@dataclass(frozen=True)
class Size:
    image_size: int
    images: int
    starts: int
    clicks: int


FULL_SIZE = Size(FULL.image_size, FULL.test_images, starts=3, clicks=20)
QUICK_SIZE = Size(64, 3, starts=1, clicks=3)


@dataclass(frozen=True)
class Models:
    student: Path
    teacher: Path
    data: Path
    trained: bool


def demo_models(size: Size, folder: Path) -> Models:
    """The demo's runs and test images, or random stand-ins of the same sizes in `folder`."""
    paths = Paths(DEMO)
    if size == FULL_SIZE and (paths.distilled_run / "student.pt").is_file():
        return Models(paths.distilled_run, paths.teacher_run, paths.split("test"), True)
    data = write_shapes_dataset(folder / "test", size.images, seed=1)
    runs = []
    for name, model_type in (("student-kd", STUDENT_TYPE), ("teacher", TEACHER_TYPE)):
        run = folder / name
        run.mkdir()
        settings = load_settings(
            None,
            [f"student.model_type={model_type}", f"data.image_size={size.image_size}"],
            environ={},
        )
        (run / "settings.yaml").write_text(settings.to_yaml())
        torch.manual_seed(0)
        save_state_dict(build_sam(model_type, image_size=size.image_size), run / "student.pt")
        runs.append(run)
    return Models(runs[0], runs[1], data, False)


def median_p90(values: list[float]) -> tuple[float, float]:
    ordered = sorted(values)
    return statistics.median(ordered), ordered[round(0.9 * (len(ordered) - 1))]


def start_up_seconds(models: Models, folder: Path, starts: int) -> tuple[list[float], list[float]]:
    """From launching `samkd view` until its page answers, `starts` times: the wall time, and
    the CPU time the command used (what the wall time would be on an idle core)."""
    walls, cpus = [], []
    for _ in range(starts):
        began = time.perf_counter()
        with serving(
            [models.student, models.teacher, "--data", models.data],
            folder / "server.log",
            cwd=DEMO.parent,
            threads=torch.get_num_threads(),
        ) as server:
            walls.append(time.perf_counter() - began)
            cpus.append(server.cpu_seconds() or float("nan"))
    return walls, cpus


def import_seconds(starts: int) -> tuple[list[float], list[float]]:
    """The floor of any such page: a Python process importing torch and Gradio (wall and CPU
    seconds)."""
    walls, cpus = [], []
    for _ in range(starts):
        before = os.times()
        began = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import torch, gradio"], check=True)
        walls.append(time.perf_counter() - began)
        after = os.times()
        cpus.append(
            after.children_user
            + after.children_system
            - before.children_user
            - before.children_system
        )
    return walls, cpus


@dataclass
class Clicks:
    """Seconds per click: both decoders, the drawing, and the encoders an image costs."""

    decoders: list[float]
    drawing: list[float]
    encoders: list[float]

    @property
    def answers(self) -> list[float]:
        return [a + b for a, b in zip(self.decoders, self.drawing, strict=True)]


def click_seconds(models: Models, count: int, threads: int) -> Clicks:
    """Clicks on the centre points of the images' objects, as the page answers them, with
    `threads` torch threads."""
    default = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _click_seconds(models, count)
    finally:
        torch.set_num_threads(default)


def _click_seconds(models: Models, count: int) -> Clicks:
    settings = load_settings(None, [], environ={})
    specs = model_sources([models.student, models.teacher], None, None, settings)
    loaded = [load_model(spec, torch.device("cpu")) for spec in specs]
    images = DatasetImages(models.data, settings.data)
    viewer = Viewer(Predictor(loaded), images)
    measured = Clicks([], [], [])
    index = 0
    while len(measured.decoders) < count:
        state = viewer.open_index(index % len(images))
        measured.encoders.append(sum(seconds for _, seconds, _ in state.encoded))
        assert state.image is not None and state.image.objects is not None
        centres = center_point_prompts(torch.from_numpy(state.image.objects)).point_coords
        assert centres is not None
        for x, y in centres[:, 0].tolist():
            state = viewer.click(state, int(x), int(y), POSITIVE_POINT)
            measured.decoders.append(sum(answer.decoder_seconds for answer in state.answers))
            measured.drawing.append(viewer.draw(state).seconds)
        index += 1
    return measured


def browser_seconds(models: Models, folder: Path, count: int) -> tuple[float, list[float]]:
    """In Chromium: the page's first image after loading, and each click until the page shows
    its answer (the server's work, Gradio's transfer of the pictures, the browser's update)."""
    executable = find_chromium()
    assert executable is not None
    images = DatasetImages(models.data, load_settings(None, [], environ={}).data)
    first = images.load(0)
    assert first.objects is not None
    centres = center_point_prompts(torch.from_numpy(first.objects)).point_coords
    assert centres is not None
    arguments = [models.student, models.teacher, "--data", models.data]
    threads = torch.get_num_threads()
    with (
        serving(arguments, folder / "server.log", DEMO.parent, threads) as server,
        chromium(executable) as browser,
    ):
        page = browser.new_page(viewport={"width": 1400, "height": 1250})
        began = time.perf_counter()
        page.goto(server.url)
        page.wait_for_selector("#view-results-table[data-prompts='0'] td", timeout=WAIT_MS)
        loaded = time.perf_counter() - began
        seconds = []
        for number in range(1, count + 1):
            x, y = centres[(number - 1) % len(centres), 0].tolist()
            began = time.perf_counter()
            click_pixel(page, "#view-canvas img", x + number % 3, y, first.size[1])
            page.wait_for_selector(f"#view-results-table[data-prompts='{number}']", timeout=WAIT_MS)
            seconds.append(time.perf_counter() - began)
    return loaded, seconds


def refresh_seconds(models: Models, repeats: int) -> tuple[float, int]:
    """The run tab's refresh of the student run: read its log, plot every term."""
    seconds = []
    terms = 0
    for _ in range(repeats):
        began = time.perf_counter()
        terms = len(read_run(models.student).terms)
        seconds.append(time.perf_counter() - began)
    return statistics.median(seconds), terms


def start_table(
    starts: tuple[list[float], list[float]], imports: tuple[list[float], list[float]]
) -> ResultTable:
    table = ResultTable(
        ["measure", "wall, median (s)", "wall, max (s)", "CPU, median (s)", "vs the imports"]
    )
    baseline = statistics.median(imports[0])
    for label, (walls, cpus) in (
        (f"`samkd view` until the page answers ({len(starts[0])} runs)", starts),
        ("`python -c 'import torch, gradio'` (baseline)", imports),
    ):
        median = statistics.median(walls)
        table.add(
            label,
            f"{median:.2f}",
            f"{max(walls):.2f}",
            f"{statistics.median(cpus):.2f}",
            f"{median / baseline:.2f}x",
        )
    return table


def click_table(clicks: Clicks, one_thread: Clicks | None, in_browser: list[float]) -> ResultTable:
    """Each time against the encoders' of the same run (what a click would cost without the
    embedding cache)."""
    table = ResultTable(["per click", "median (ms)", "p90 (ms)", "vs encoding the image again"])
    encoders = statistics.median(clicks.encoders)
    rows = [
        ("answer: both decoders + drawing", clicks.answers, encoders),
        ("both mask decoders (single + 3 choices each)", clicks.decoders, encoders),
        ("drawing (panels, choices, table)", clicks.drawing, encoders),
        ("both image encoders, once per image (baseline)", clicks.encoders, encoders),
    ]
    if one_thread is not None:
        alone = statistics.median(one_thread.encoders)
        rows.append(("answer, 1 torch thread (OMP_NUM_THREADS=1)", one_thread.answers, alone))
        rows.append(("both image encoders, 1 torch thread", one_thread.encoders, alone))
    if in_browser:
        label = f"in Chromium: from the click until the answer shows ({len(in_browser)})"
        rows.append((label, in_browser, encoders))
    for label, values, baseline in rows:
        median, p90 = median_p90(values)
        table.add(label, f"{median * 1e3:.1f}", f"{p90 * 1e3:.1f}", f"{median / baseline:.2f}x")
    return table


def run(quick: bool) -> Section:
    size = QUICK_SIZE if quick else FULL_SIZE
    in_browser: list[float] = []
    notes = []
    with tempfile.TemporaryDirectory(prefix="samkd-view-") as work:
        folder = Path(work)
        models = demo_models(size, folder)
        starts = start_up_seconds(models, folder, size.starts)
        imports = import_seconds(size.starts)
        threads = torch.get_num_threads()
        clicks = click_seconds(models, size.clicks, threads)
        one_thread = click_seconds(models, size.clicks, 1) if threads > 1 else None
        weights = "the CPU demo's trained runs" if models.trained else "random weights"
        variable = os.environ.get("OMP_NUM_THREADS", "unset")
        notes.append(
            f"Models: {weights} ({STUDENT_TYPE} and {TEACHER_TYPE} at {size.image_size} px); "
            f"{len(clicks.answers)} clicks on objects' centre points; "
            f"{threads} torch threads (OMP_NUM_THREADS {variable})."
        )
        if find_chromium() is not None:
            first_image, in_browser = browser_seconds(models, folder, max(3, size.clicks // 4))
            notes.append(
                f"In Chromium, the page's first image and table appeared {first_image:.2f} s "
                "after it was opened."
            )
        else:
            notes.append("No chromium here: the answer in the browser was not measured.")
        if (models.student / "metrics.jsonl").is_file():
            refresh, terms = refresh_seconds(models, 3)
            notes.append(
                f"Run tab: reading the student run's log and plotting its {terms} terms took "
                f"{refresh:.2f} s (median of 3)."
            )
    return Section(
        NAME,
        "samkd view: start-up and the answer to a click",
        (
            "`samkd view STUDENT_RUN TEACHER_RUN --data TEST_IMAGES` with the CPU demo's "
            "models. Start-up: from launching the command until its page answers over HTTP "
            "(Python, torch and Gradio imports, both models loaded, the dataset indexed); its "
            "CPU time is what the wall time would be on an idle core. "
            "A click: each model's mask decoder, run twice (the single output and the three "
            "choices), on the cached image embedding, then the drawing of the panels, the "
            "choices and the table; the image encoders run once per image, when it is "
            "opened (the baseline: what every click would cost without the cache)."
        ),
        [start_table(starts, imports), click_table(clicks, one_thread, in_browser)],
        [*notes, NOISE_NOTE],
    )
