"""The page's layout (Gradio, no browser): the controls of each model, or the run tab alone."""

from pathlib import Path
from typing import Any

from samkd.view.predictor import Predictor
from samkd.view.sources import LoadedModel
from samkd.view.viewer import Viewer

from .conftest import require


def element_ids(page: Any) -> set[str]:
    return {
        block["props"]["elem_id"]
        for block in page.config["components"]
        if block.get("props", {}).get("elem_id")
    }


def test_a_panel_and_choices_per_model_and_the_run_tab(
    models: list[LoadedModel], student_run: Path
) -> None:
    require("gradio")
    from samkd.view.page import build_page

    page = build_page(Viewer(Predictor(models)), student_run)
    assert page.analytics_enabled is False
    ids = element_ids(page)
    assert {
        "view-canvas",
        "view-results",
        "view-panel-0",
        "view-panel-1",
        "view-choices-1",
        "run-folder",
        "run-terms",
        "run-curves",
        "run-settings",
    } <= ids
    folder = next(b for b in page.config["components"] if b["props"].get("elem_id") == "run-folder")
    assert folder["props"]["value"] == str(student_run)


def test_the_run_tab_alone(student_run: Path) -> None:
    require("gradio")
    from samkd.view.page import NO_MODELS, build_page

    page = build_page(Viewer(Predictor([])), student_run)
    ids = element_ids(page)
    assert "view-canvas" not in ids and "run-terms" in ids
    texts = [block["props"].get("value") for block in page.config["components"]]
    assert NO_MODELS in texts
