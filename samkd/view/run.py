"""Starting the page: load the models and the dataset, then serve until Ctrl-C."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from rich.console import Console

from samkd.errors import UsageError
from samkd.runtime import resolve_device
from samkd.settings import Settings
from samkd.view.sources import is_run_folder, load_model, model_sources

VIEW_EXTRA = "pip install 'samkd[view]'"
DEFAULT_HOST = "127.0.0.1"


def require_view_extra() -> None:
    """A one-line `UsageError` naming the `view` extra when Gradio is missing."""
    if importlib.util.find_spec("gradio") is None:
        raise UsageError(f"gradio is not installed; samkd view needs the view extra: {VIEW_EXTRA}")


def run_view(
    settings: Settings,
    sources: list[Path],
    teacher: str | None = None,
    teacher_checkpoint: Path | None = None,
    data: Path | None = None,
    run: Path | None = None,
    host: str = DEFAULT_HOST,
    port: int | None = None,
    share: bool = False,
    console: Console | None = None,
) -> None:
    """Serve the page on `host:port` (the first free port from 7860 when None) until
    interrupted. `sources`, `teacher`: the models (see `samkd.view.sources`); `data`: a
    dataset folder to pick images from; `run`: the run tab's folder (default: the first run
    folder among `sources`)."""
    console = console or Console()
    # Gradio reads this when it is imported: no usage statistics leave the machine.
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    require_view_extra()
    specs = model_sources(sources, teacher, teacher_checkpoint, settings)
    if not specs and run is None:
        raise UsageError(
            "nothing to look at: pass a run folder, checkpoint or export folder, --teacher, "
            "or --run RUN_FOLDER for the curves alone"
        )
    device = resolve_device(settings.eval.device)
    from samkd.view.images import DatasetImages
    from samkd.view.page import CSS, build_page
    from samkd.view.predictor import Predictor
    from samkd.view.viewer import Viewer

    with console.status("loading the models"):
        models = [load_model(spec, device) for spec in specs]
    images = DatasetImages(data, settings.data) if data is not None else None
    if run is None:
        run = next((path for path in sources if is_run_folder(path)), None)
    page = build_page(Viewer(Predictor(models), images), run)
    page.queue()
    page.launch(
        server_name=host,
        server_port=port,
        share=share,
        prevent_thread_lock=True,
        quiet=True,
        css=CSS,
    )
    for spec in specs:
        console.print(f"{spec.label}: {spec.describe(short=False)}", highlight=False)
    if images is not None:
        console.print(f"{len(images)} images in {data}", highlight=False)
    if run is not None:
        console.print(f"run tab: {run}", highlight=False)
    url = page.share_url if share and page.share_url else page.local_url
    console.print(f"samkd view: {url} (Ctrl-C to stop)", highlight=False)
    page.block_thread()
