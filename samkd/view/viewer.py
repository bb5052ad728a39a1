"""What the page does, without the page: open an image, add a click or a box corner, undo,
and draw the result. `samkd.view.page` wires these to Gradio; tests call them directly."""

from __future__ import annotations

import html
import time
from dataclasses import dataclass, field, replace

import numpy as np

from samkd.view.drawing import (
    MODEL_COLOUR_NAMES,
    display_scale,
    draw_both,
    draw_choice,
    draw_mask,
    draw_prompts,
)
from samkd.view.images import DatasetImages
from samkd.view.predictor import (
    NEGATIVE,
    POSITIVE,
    SINGLE,
    Click,
    ModelAnswer,
    Predictor,
    Prompts,
    ViewImage,
    nearest_object,
)

POSITIVE_POINT = "positive point"
NEGATIVE_POINT = "negative point"
BOX_CORNER = "box (two corners)"
CLICK_MODES = (POSITIVE_POINT, NEGATIVE_POINT, BOX_CORNER)
SIDE_BY_SIDE = "side by side"
OVERLAID = "overlaid"
LAYOUTS = (SIDE_BY_SIDE, OVERLAID)


@dataclass(frozen=True)
class PageState:
    """One browser session's view: the image, its prompts, the first corner of a box being
    drawn, and the models' latest answers (with the seconds they took)."""

    image: ViewImage | None = None
    prompts: Prompts = Prompts()
    corner: tuple[int, int] | None = None
    answers: tuple[ModelAnswer, ...] = ()
    answer_seconds: float = 0.0
    encoded: tuple[tuple[str, float, bool], ...] = ()


@dataclass
class Drawn:
    """Everything the page shows for a state: `canvas` (the image to click on), per model a
    mask panel and its multimask choices (image, caption), `overlaid` (both masks), the
    results table (HTML) and the seconds the drawing took."""

    canvas: np.ndarray | None
    panels: list[np.ndarray | None]
    choices: list[list[tuple[np.ndarray, str]]]
    overlaid: np.ndarray | None
    results: str
    seconds: float = 0.0
    titles: list[str] = field(default_factory=list)


class Viewer:
    """The models (`predictor`) and the dataset (`images`, or None: uploads only)."""

    def __init__(self, predictor: Predictor, images: DatasetImages | None = None) -> None:
        self.predictor = predictor
        self.images = images

    @property
    def labels(self) -> list[str]:
        return [model.label for model in self.predictor.models]

    def open(self, image: ViewImage) -> PageState:
        """A fresh state on `image`, its embeddings computed (or found cached) now, so the
        first click waits for the decoders only."""
        encoded = []
        for model in self.predictor.models:
            embedding, cached = self.predictor.embed(model, image)
            encoded.append((model.label, embedding.seconds, cached))
        return PageState(image=image, encoded=tuple(encoded))

    def open_index(self, index: int) -> PageState:
        assert self.images is not None
        return self.open(self.images.load(index))

    def click(self, state: PageState, x: int, y: int, mode: str) -> PageState:
        """Add a click at image pixel `(x, y)`: a point, or a box corner (the second corner
        completes the box, replacing an earlier one). Answers when there are prompts."""
        if state.image is None:
            return state
        height, width = state.image.size
        x, y = min(max(x, 0), width - 1), min(max(y, 0), height - 1)
        if mode == BOX_CORNER:
            if state.corner is None:
                return replace(state, corner=(x, y))
            prompts = state.prompts.with_box(state.corner, (x, y))
        else:
            label = POSITIVE if mode == POSITIVE_POINT else NEGATIVE
            prompts = state.prompts.with_click(Click(x, y, label))
        return self.answer(replace(state, prompts=prompts, corner=None))

    def undo(self, state: PageState) -> PageState:
        """Drop the box corner being drawn, else the latest click (then the box)."""
        if state.corner is not None:
            return replace(state, corner=None)
        return self.answer(replace(state, prompts=state.prompts.without_last()))

    def clear(self, state: PageState) -> PageState:
        return replace(state, prompts=Prompts(), corner=None, answers=())

    def answer(self, state: PageState) -> PageState:
        if state.image is None or not state.prompts:
            return replace(state, answers=())
        began = time.perf_counter()
        answers = self.predictor.answer(state.image, state.prompts)
        return replace(state, answers=tuple(answers), answer_seconds=time.perf_counter() - began)

    def draw(self, state: PageState, shown: str = SINGLE, layout: str = SIDE_BY_SIDE) -> Drawn:
        """The pictures and the table of `state`, with the mask `shown` picks of each model."""
        began = time.perf_counter()
        count = len(self.predictor.models)
        image = state.image
        if image is None:
            return Drawn(None, [None] * count, [[] for _ in range(count)], None, _no_image())
        scale = display_scale(image.size)
        target = nearest_object(image, state.prompts)
        target_mask = None if target is None or image.objects is None else image.objects[target]
        canvas = draw_prompts(image.pixels, state.prompts, scale, state.corner)
        panels: list[np.ndarray | None] = [None] * count
        choices: list[list[tuple[np.ndarray, str]]] = [[] for _ in range(count)]
        overlaid = None
        if state.answers:
            masks = [answer.mask(shown)[0] for answer in state.answers]
            if layout == OVERLAID:
                overlaid = draw_both(image.pixels, masks, state.prompts, scale)
            else:
                panels = [
                    draw_mask(image.pixels, mask, target_mask, state.prompts, scale)
                    for mask in masks
                ]
            choices = [_choices(image.pixels, answer) for answer in state.answers]
        drawn = Drawn(canvas, panels, choices, overlaid, "")
        drawn.seconds = time.perf_counter() - began
        drawn.results = results_table(self, state, shown, target, drawn.seconds)
        return drawn


def _choices(pixels: np.ndarray, answer: ModelAnswer) -> list[tuple[np.ndarray, str]]:
    shown = []
    for index, (mask, score) in enumerate(zip(answer.choices, answer.choice_scores, strict=True)):
        caption = f"{index + 1}: predicted {score:.3f}"
        if answer.choice_ious is not None:
            caption += f", IoU {answer.choice_ious[index]:.4f}"
        shown.append((draw_choice(pixels, mask), caption))
    return shown


def _no_image() -> str:
    return '<div id="view-results-table"><p>Pick an image or upload one.</p></div>'


def _cell(model: int, name: str, text: str, value: float | None = None) -> str:
    """A table cell that tests and scripts can read: `data-model`, `data-field` and the
    full-precision `data-value`."""
    data = "" if value is None else f' data-value="{value!r}"'
    return f'<td data-model="{model}" data-field="{name}"{data}>{html.escape(text)}</td>'


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def _number(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def results_table(
    viewer: Viewer, state: PageState, shown: str, target: int | None, draw_seconds: float
) -> str:
    """The numbers of the latest answer (or of the encoders, before any click): one column
    per model."""
    image = state.image
    assert image is not None
    models = viewer.predictor.models
    header = "".join(
        f"<th>{html.escape(model.label)} ({MODEL_COLOUR_NAMES[n]} when overlaid)</th>"
        for n, model in enumerate(models)
    )
    rows = [_row("model", [_cell(n, "model", m.description) for n, m in enumerate(models)])]
    encoders = {label: (seconds, cached) for label, seconds, cached in state.encoded}
    for answer in state.answers:
        encoders[answer.label] = (answer.encoder_seconds, answer.encoder_cached)
    encoder_cells = []
    for n, model in enumerate(models):
        seconds, cached = encoders.get(model.label, (None, False))
        text = "-" if seconds is None else _ms(seconds) + (" (cached)" if cached else "")
        encoder_cells.append(_cell(n, "encoder_ms", text, seconds))
    rows.append(_row("image encoder (once per image)", encoder_cells))
    if state.answers:
        rows.append(_answer_rows(state.answers, shown, target))
    summary = _ground_truth_text(image, target, state)
    if state.answers:
        decoders = sum(answer.decoder_seconds for answer in state.answers)
        summary += (
            f" Answered in {_ms(state.answer_seconds + draw_seconds)}: decoders "
            f"{_ms(decoders)}, drawing {_ms(draw_seconds)}."
        )
    # How many prompts the numbers answer: scripts wait for it after a click.
    prompts = len(state.prompts.clicks) + (state.prompts.box is not None)
    corner = int(state.corner is not None)
    return (
        f'<div id="view-results-table" data-prompts="{prompts if state.answers else 0}" '
        f'data-corner="{corner}">'
        f'<p id="view-summary">{html.escape(summary)}</p>'
        f"<table><tr><th></th>{header}</tr>{''.join(rows)}</table></div>"
    )


def _row(title: str, cells: list[str]) -> str:
    return f"<tr><td>{html.escape(title)}</td>{''.join(cells)}</tr>"


def _answer_rows(answers: tuple[ModelAnswer, ...], shown: str, target: int | None) -> str:
    picked = [answer.mask(shown) for answer in answers]
    numbered = list(enumerate(answers))
    iou_title = "IoU with the object" if target is None else f"IoU with object {target + 1}"
    rows = [
        _row(
            "mask decoder (single + 3 choices)",
            [
                _cell(n, "decoder_ms", _ms(a.decoder_seconds), a.decoder_seconds)
                for n, a in numbered
            ],
        ),
        _row(
            f"shown: {shown}, predicted IoU",
            [_cell(n, "score", _number(p[1], 3), p[1]) for n, p in enumerate(picked)],
        ),
        _row(iou_title, [_cell(n, "iou", _number(p[2]), p[2]) for n, p in enumerate(picked)]),
        _row(
            "choices 1-3, predicted IoU",
            [_cell(n, "choice_scores", _numbers(a.choice_scores, 3)) for n, a in numbered],
        ),
        _row(
            "choices 1-3, IoU with the object",
            [_cell(n, "choice_ious", _numbers(a.choice_ious or [None] * 3)) for n, a in numbered],
        ),
    ]
    return "".join(rows)


def _numbers(values: list[float] | list[None], digits: int = 4) -> str:
    return " / ".join(_number(value, digits) for value in values)


def _ground_truth_text(image: ViewImage, target: int | None, state: PageState) -> str:
    if image.objects is None:
        return f"{image.name}: no ground truth (an uploaded image)."
    count = len(image.objects)
    objects = f"{count} object{'' if count == 1 else 's'}"
    if target is None:
        what = "click a positive point or draw a box" if not state.answers else "no object prompted"
        return f"{image.name}: {objects}; {what}."
    area = int(image.objects[target].sum())
    return f"{image.name}: {objects}; prompted object {target + 1} ({area} px)."
