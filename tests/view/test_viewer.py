"""The page's steps without a browser: open, click, draw a box, undo, clear, and what is drawn."""

import re
from pathlib import Path

import numpy as np
import pytest

from samkd.settings import DataSettings
from samkd.view.drawing import display_scale, draw_prompts, enlarge
from samkd.view.images import DatasetImages, uploaded_image
from samkd.view.predictor import BEST_SCORE, SINGLE, Click, Predictor, Prompts
from samkd.view.sources import LoadedModel
from samkd.view.viewer import (
    BOX_CORNER,
    NEGATIVE_POINT,
    OVERLAID,
    POSITIVE_POINT,
    SIDE_BY_SIDE,
    PageState,
    Viewer,
)


@pytest.fixture(scope="module")
def viewer(models: list[LoadedModel], shapes: Path) -> Viewer:
    return Viewer(Predictor(models), DatasetImages(shapes, DataSettings()))


def cell(results: str, model: int, field: str) -> str:
    """The `data-value` of one cell of the results table."""
    match = re.search(rf'data-model="{model}" data-field="{field}" data-value="([^"]+)"', results)
    assert match is not None, (model, field, results)
    return match[1]


def test_opening_an_image_runs_the_encoders(viewer: Viewer) -> None:
    computed = viewer.predictor.cache.computed
    state = viewer.open_index(2)
    assert [label for label, _, _ in state.encoded] == ["student", "teacher"]
    assert viewer.predictor.cache.computed in (computed, computed + 2)
    drawn = viewer.draw(state)
    assert drawn.canvas is not None and drawn.panels == [None, None]
    assert "image encoder (once per image)" in drawn.results
    assert "click a positive point or draw a box" in drawn.results


def test_clicks_answer_with_both_models(viewer: Viewer) -> None:
    state = viewer.open_index(0)
    assert state.image is not None and state.image.objects is not None
    rows, columns = np.nonzero(state.image.objects[0])
    state = viewer.click(
        state, int(columns[len(columns) // 2]), int(rows[len(rows) // 2]), POSITIVE_POINT
    )
    state = viewer.click(state, 1, 1, NEGATIVE_POINT)
    assert [click.label for click in state.prompts.clicks] == [1, 0]
    assert len(state.answers) == 2
    drawn = viewer.draw(state, SINGLE, SIDE_BY_SIDE)
    scale = display_scale(state.image.size)
    assert scale == 4  # a 96 x 128 image is shown 4 times larger
    for panel in drawn.panels:
        assert panel is not None and panel.shape == (96 * scale, 128 * scale, 3)
    assert drawn.overlaid is None
    assert [len(choices) for choices in drawn.choices] == [3, 3]
    for number, answer in enumerate(state.answers):
        assert float(cell(drawn.results, number, "iou")) == answer.single_iou
        assert float(cell(drawn.results, number, "decoder_ms")) == answer.decoder_seconds
    assert "prompted object 1" in drawn.results
    overlaid = viewer.draw(state, BEST_SCORE, OVERLAID)
    assert overlaid.overlaid is not None and overlaid.panels == [None, None]
    best = state.answers[0].mask(BEST_SCORE)[2]
    assert float(cell(overlaid.results, 0, "iou")) == best


def test_a_box_takes_two_corners_and_undo_goes_back(viewer: Viewer) -> None:
    state = viewer.open_index(1)
    state = viewer.click(state, 90, 70, BOX_CORNER)
    assert state.corner == (90, 70) and not state.answers
    state = viewer.click(state, 10, 500, BOX_CORNER)  # clipped to the image
    assert state.prompts.box == (10, 70, 90, 95) and state.corner is None
    assert len(state.answers) == 2
    state = viewer.click(state, 20, 20, BOX_CORNER)
    assert viewer.undo(state).corner is None and viewer.undo(state).prompts == state.prompts
    state = viewer.undo(viewer.undo(state))
    assert not state.prompts and not state.answers
    cleared = viewer.clear(viewer.click(state, 5, 5, POSITIVE_POINT))
    assert not cleared.prompts and not cleared.answers


def test_an_upload_shows_no_iou(viewer: Viewer) -> None:
    assert viewer.images is not None
    state = viewer.open(uploaded_image(viewer.images.load(0).pixels[::-1].copy()))
    state = viewer.click(state, 30, 30, POSITIVE_POINT)
    drawn = viewer.draw(state)
    assert "no ground truth" in drawn.results
    assert 'data-field="iou">-<' in drawn.results


def test_no_image_yet(viewer: Viewer) -> None:
    state = viewer.click(PageState(), 3, 3, POSITIVE_POINT)
    assert state == PageState()
    assert "Pick an image" in viewer.draw(state).results


def test_prompts_are_drawn_on_the_enlarged_pixels() -> None:
    pixels = np.zeros((10, 20, 3), np.uint8)
    assert (enlarge(pixels, 3).shape, display_scale((10, 20)), display_scale((600, 900))) == (
        (30, 60, 3),
        8,
        1,
    )
    drawn = draw_prompts(pixels, Prompts((Click(5, 5, 1),), box=(0, 0, 19, 9)), 8)
    assert drawn.shape == (80, 160, 3)
    assert tuple(drawn[5 * 8 + 4, 5 * 8 + 4]) == (40, 200, 60)  # the point's centre is green
    assert tuple(drawn[0, 80]) == (255, 220, 0)  # the box's top edge is yellow
