"""The web page (Gradio): a tab to click on images and compare the models' masks, and a tab
for a training run's curves, summary and settings."""

from __future__ import annotations

import html
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np

from samkd.data import DataError
from samkd.errors import UsageError
from samkd.view.drawing import display_scale
from samkd.view.images import uploaded_image
from samkd.view.predictor import SHOWN_MASKS, SINGLE
from samkd.view.runs import RunSnapshot, change_token, read_run
from samkd.view.viewer import (
    CLICK_MODES,
    LAYOUTS,
    POSITIVE_POINT,
    SIDE_BY_SIDE,
    Drawn,
    PageState,
    Viewer,
)

TITLE = "samkd view"
# Seconds between checks of the run's metrics.jsonl while the run tab refreshes.
REFRESH_SECONDS = 2.0
IMAGE_HEIGHT = 440
# The pictures a click sends: JPEG encodes a 512 px picture in 2 ms where PNG takes 25 times
# longer (BENCHMARKS.md, `view`); the plots of the run tab stay PNG, for their thin lines.
PICTURES = "jpeg"
# Every 10 minutes, Gradio deletes the pictures it sent more than an hour ago.
CACHE_CLEANING = (600, 3600)
# The masks tab's events run one at a time: a click, an undo and a new image never race.
MASKS_QUEUE = "masks"
EXPLANATION = (
    "Click on the image: each click adds a point (positive or negative, as chosen below), or a "
    "box corner (two clicks draw a box). Each model shows its mask in red, the ground-truth "
    "object the prompts point at in green. The image encoder runs once per image and model; "
    "a click runs the mask decoders only."
)
NO_MODELS = (
    "No model to look at: give `samkd view` a run folder, a checkpoint or an export folder, "
    "or `--teacher`."
)
CSS = """
#view-results table, #run-summary table, #run-terms table { border-collapse: collapse; }
#view-results td, #view-results th, #run-summary td, #run-terms td, #run-terms th {
  padding: 2px 10px; border-bottom: 1px solid var(--border-color-primary); text-align: left;
}
#view-results td:first-child { white-space: nowrap; }
"""


class Outputs:
    """The click tab's output components, in the order `Drawn` fills them: built in two
    parts, the mask panels beside the canvas, the table and the choices below."""

    def __init__(self, labels: list[str]) -> None:
        self.labels = labels

    def build_panels(self) -> None:
        self.panels = [
            gr.Image(
                label=f"{label}: mask (red), object (green)",
                interactive=False,
                format=PICTURES,
                height=IMAGE_HEIGHT,
                elem_id=f"view-panel-{n}",
            )
            for n, label in enumerate(self.labels)
        ]
        self.overlaid = gr.Image(
            label=f"{' vs '.join(self.labels)}: both masks",
            interactive=False,
            format=PICTURES,
            height=IMAGE_HEIGHT,
            visible=False,
            elem_id="view-overlaid",
        )

    def build_numbers(self) -> None:
        self.results = gr.HTML(elem_id="view-results")
        with gr.Column():
            self.choices = [
                gr.Gallery(
                    label=f"{label}: the three multimask outputs",
                    columns=3,
                    height=180,
                    object_fit="contain",
                    format=PICTURES,
                    elem_id=f"view-choices-{n}",
                )
                for n, label in enumerate(self.labels)
            ]

    def all(self) -> list[Any]:
        return [*self.panels, self.overlaid, self.results, *self.choices]

    def values(self, drawn: Drawn, layout: str) -> list[Any]:
        side = layout == SIDE_BY_SIDE
        panels = [gr.update(value=panel, visible=side) for panel in drawn.panels]
        overlaid = gr.update(value=drawn.overlaid, visible=not side)
        return [*panels, overlaid, drawn.results, *drawn.choices]


def build_page(viewer: Viewer, run_folder: Path | None = None) -> gr.Blocks:
    """The page of `viewer`'s models and images; the run tab opens `run_folder` first."""
    with gr.Blocks(title=TITLE, analytics_enabled=False, delete_cache=CACHE_CLEANING) as page:
        names = " vs ".join(html.escape(label) for label in viewer.labels)
        gr.Markdown(f"# {TITLE}: {names}" if names else f"# {TITLE}")
        with gr.Tab("Masks", id="masks"):
            if viewer.predictor.models:
                _masks_tab(viewer, page)
            else:
                gr.Markdown(NO_MODELS)
        with gr.Tab("Training run", id="run"):
            _run_tab(run_folder)
    return page


def _masks_tab(viewer: Viewer, page: gr.Blocks) -> None:
    state = gr.State(PageState())
    ids = viewer.images.ids if viewer.images is not None else []
    gr.Markdown(EXPLANATION)
    with gr.Row(equal_height=False):
        with gr.Column(scale=1, min_width=220):
            picker = gr.Dropdown(
                choices=ids,
                value=ids[0] if ids else None,
                label="image",
                visible=bool(ids),
                elem_id="view-image-picker",
            )
            with gr.Row(visible=bool(ids)):
                previous = gr.Button("previous", size="sm", elem_id="view-previous")
                following = gr.Button("next", size="sm", elem_id="view-next")
        mode = gr.Radio(
            list(CLICK_MODES),
            value=POSITIVE_POINT,
            label="a click adds",
            scale=1,
            elem_id="view-click-mode",
        )
        shown = gr.Radio(
            list(SHOWN_MASKS), value=SINGLE, label="mask shown", scale=1, elem_id="view-shown"
        )
        with gr.Column(scale=1, min_width=180):
            layout = gr.Radio(
                list(LAYOUTS), value=SIDE_BY_SIDE, label="masks", elem_id="view-layout"
            )
            with gr.Row():
                undo = gr.Button("undo", size="sm", elem_id="view-undo")
                clear = gr.Button("clear", size="sm", elem_id="view-clear")
        upload = gr.Image(
            label="or upload an image",
            sources=["upload"],
            type="numpy",
            height=120,
            scale=1,
            elem_id="view-upload",
        )
    outputs = Outputs(viewer.labels)
    with gr.Row():
        canvas = gr.Image(
            label="click here",
            interactive=False,
            format=PICTURES,
            height=IMAGE_HEIGHT,
            elem_id="view-canvas",
        )
        outputs.build_panels()
    with gr.Row():
        outputs.build_numbers()
    views = [canvas, *outputs.all()]

    def show(new: PageState, shown_mask: str, layout_name: str) -> list[Any]:
        drawn = viewer.draw(new, shown_mask, layout_name)
        return [new, drawn.canvas, *outputs.values(drawn, layout_name)]

    def pick(image_id: str | None, shown_mask: str, layout_name: str) -> list[Any]:
        if image_id is None or viewer.images is None:
            return [gr.skip()] * (len(views) + 1)
        new = _guarded(lambda: viewer.open_index(ids.index(image_id)))
        return show(new, shown_mask, layout_name)

    def step(image_id: str | None, offset: int) -> str | None:
        if not ids:
            return None
        position = ids.index(image_id) if image_id in ids else 0
        return ids[(position + offset) % len(ids)]

    def uploaded(pixels: np.ndarray | None, shown_mask: str, layout_name: str) -> list[Any]:
        if pixels is None:
            return [gr.skip()] * (len(views) + 1)
        return show(_guarded(lambda: viewer.open(uploaded_image(pixels))), shown_mask, layout_name)

    def redraw(change: Callable[[PageState], PageState] | None) -> Callable[..., list[Any]]:
        """An event that applies `change` (None: none) to the state and shows it."""

        def apply(old: PageState, shown_mask: str, layout_name: str) -> list[Any]:
            return show(old if change is None else change(old), shown_mask, layout_name)

        return apply

    def clicked(
        old: PageState, click_mode: str, shown_mask: str, layout_name: str, event: gr.SelectData
    ) -> list[Any]:
        if old.image is None or event.index is None:
            return [gr.skip()] * (len(views) + 1)
        scale = display_scale(old.image.size)
        x, y = (int(value) // scale for value in event.index)
        return show(viewer.click(old, x, y, click_mode), shown_mask, layout_name)

    settings = [shown, layout]
    targets = [state, *views]
    picker.change(pick, [picker, *settings], targets, concurrency_id=MASKS_QUEUE)
    previous.click(lambda image_id: step(image_id, -1), picker, picker)
    following.click(lambda image_id: step(image_id, 1), picker, picker)
    upload.upload(uploaded, [upload, *settings], targets, concurrency_id=MASKS_QUEUE)
    canvas.select(clicked, [state, mode, *settings], targets, concurrency_id=MASKS_QUEUE)
    undo.click(redraw(viewer.undo), [state, *settings], targets, concurrency_id=MASKS_QUEUE)
    clear.click(redraw(viewer.clear), [state, *settings], targets, concurrency_id=MASKS_QUEUE)
    for control in settings:
        control.change(redraw(None), [state, *settings], targets, concurrency_id=MASKS_QUEUE)
    page.load(pick, [picker, *settings], targets, concurrency_id=MASKS_QUEUE)


def _guarded(open_image: Any) -> PageState:
    """Open an image; a bad file shows its one-line error in the page."""
    try:
        state: PageState = open_image()
    except (DataError, UsageError, OSError) as error:
        raise gr.Error(str(error)) from None
    return state


def _run_tab(run_folder: Path | None) -> None:
    token = gr.State(None)
    with gr.Row():
        folder = gr.Textbox(
            value=str(run_folder or ""),
            label="training run folder",
            scale=4,
            placeholder="runs/mine",
            elem_id="run-folder",
        )
        open_button = gr.Button("open", scale=1, elem_id="run-open")
        follow = gr.Checkbox(
            value=True, label=f"refresh every {REFRESH_SECONDS:g} s", scale=1, elem_id="run-follow"
        )
    status = gr.Markdown(elem_id="run-status")
    # No label over the plot: it would hide the first panel's title.
    curves = gr.Image(interactive=False, format="png", show_label=False, elem_id="run-curves")
    with gr.Row():
        summary = gr.HTML(elem_id="run-summary")
        terms = gr.HTML(elem_id="run-terms")
    settings = gr.Code(
        label="settings.yaml",
        language="yaml",
        interactive=False,
        max_lines=30,
        elem_id="run-settings",
    )
    timer = gr.Timer(REFRESH_SECONDS)
    outputs = [token, status, summary, terms, curves, settings]

    def load(path: str, old_token: Any, force: bool) -> list[Any]:
        if not path.strip():
            empty = [None, "Give a training run folder.", "", "", None, ""]
            return empty if force else [gr.skip()] * len(outputs)
        run = Path(path.strip())
        new_token = change_token(run)
        if not force and new_token == old_token:
            return [gr.skip()] * len(outputs)
        try:
            snapshot = read_run(run)
        except (UsageError, OSError) as error:
            return [new_token, f"**{html.escape(str(error))}**", "", "", None, ""]
        return [new_token, *_run_values(snapshot)]

    open_button.click(lambda path, old: load(path, old, True), [folder, token], outputs)
    folder.submit(lambda path, old: load(path, old, True), [folder, token], outputs)
    timer.tick(lambda path, old: load(path, old, False), [folder, token], outputs)
    follow.change(lambda on: gr.Timer(active=on), follow, timer)


def _run_values(snapshot: RunSnapshot) -> list[Any]:
    status = f"`{snapshot.folder}`: {snapshot.records} records, {len(snapshot.terms)} logged terms"
    return [
        status,
        _summary_html(snapshot.summary),
        _terms_html(snapshot),
        snapshot.curves,
        snapshot.settings,
    ]


def _summary_html(summary: dict[str, Any]) -> str:
    """`samkd inspect`'s summary of a run, as a table."""
    best, last = summary["best_val_miou"], summary["last_val_miou"]
    changes = [
        f"step {change['step']}: {change['from']:g} -> {change['to']:g}"
        for change in summary["lambda_kd_changes"]
    ]
    rows = [
        ("steps", summary["steps"]),
        ("validations", summary["validations"]),
        (
            "best validation mIoU",
            "-" if best is None else f"{best:.4f} at step {summary['best_step']}",
        ),
        ("last validation mIoU", "-" if last is None else f"{last:.4f}"),
        ("lambda_kd changes", ", ".join(changes) or "none"),
        ("skipped steps", summary["skipped_steps"]),
        ("exported student", summary["exported"] or "not yet"),
    ]
    cells = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{html.escape(str(value))}</td></tr>"
        for name, value in rows
    )
    return f"<table>{cells}</table>"


def _terms_html(snapshot: RunSnapshot) -> str:
    rows = "".join(
        f'<tr data-term="{html.escape(term.name)}"><td>{html.escape(term.name)}</td>'
        f"<td>{term.kind}</td><td>{len(term.values)}</td><td>{term.values[-1]:.5g}</td>"
        f"<td>{min(term.values):.5g}</td><td>{max(term.values):.5g}</td></tr>"
        for term in snapshot.terms
    )
    header = "".join(
        f"<th>{name}</th>" for name in ("term", "logged in", "values", "last", "min", "max")
    )
    return f"<table><tr>{header}</tr>{rows}</table>"
