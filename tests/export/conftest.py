"""A small training run folder, exported once through the CLI (fp32 and int8), for the
export tests."""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from samkd.cli import app
from samkd.demo.shapes import write_shapes_dataset
from samkd.models import build_sam, save_state_dict
from samkd.settings import Settings, load_settings

MODEL = "vit_t_mini"
IMAGE_SIZE = 128


@dataclass(frozen=True)
class Export:
    """What `samkd export RUN --quantize int8` wrote and printed."""

    folder: Path
    summary: dict[str, Any]
    stdout: str


def export_settings(
    data: Path | None, checkpoint: Path | None, output: Path, *extra: str
) -> Settings:
    """Settings that export `checkpoint` (the small preset at 128 px) to `output`."""
    return load_settings(
        None,
        [
            f"student.model_type={MODEL}",
            f"student.checkpoint={checkpoint or 'null'}",
            f"data.image_size={IMAGE_SIZE}",
            "data.num_workers=0",
            "eval.speed=false",
            f"export.output={output}",
            *([f"data.val={data}"] if data is not None else []),
            *extra,
        ],
        environ={},
    )


@pytest.fixture(scope="package")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_shapes_dataset(tmp_path_factory.mktemp("data") / "shapes", 3, (96, 128))


@pytest.fixture(scope="package")
def run_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run's folder: its settings and the student's weights (random)."""
    run = tmp_path_factory.mktemp("run")
    settings = export_settings(None, None, run / "unused")
    (run / "settings.yaml").write_text(settings.to_yaml())
    torch.manual_seed(0)
    save_state_dict(build_sam(MODEL, image_size=IMAGE_SIZE), run / "student.pt")
    return run


@pytest.fixture(scope="package")
def checkpoint(run_folder: Path) -> Path:
    return run_folder / "student.pt"


@pytest.fixture(scope="package")
def exported(tmp_path_factory: pytest.TempPathFactory, run_folder: Path, shapes: Path) -> Export:
    folder = tmp_path_factory.mktemp("export") / "onnx"
    result = CliRunner().invoke(
        app,
        ["export", str(run_folder), "--data", str(shapes), "-o", str(folder),
         "--quantize", "int8", "--set", "data.num_workers=0"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return Export(folder, json.loads((folder / "parity.json").read_text()), result.stdout)
