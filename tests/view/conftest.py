"""Small models and data for the view's tests: generated shapes, a student and a teacher run
folder (random weights at 64 px) with a training log, and the models loaded."""

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from samkd.demo.shapes import write_shapes_dataset
from samkd.models import build_sam, save_state_dict
from samkd.settings import load_settings
from samkd.view.sources import LoadedModel, load_model, model_sources

STUDENT, TEACHER = "vit_t_mini", "vit_mini"
IMAGE_SIZE = 64
# What a training run logs (the term names of a real run's metrics.jsonl), every kind of value.
TERMS = [
    "task/focal",
    "task/dice",
    "task/iou_mse",
    "task/total",
    "kd/t/encoder_mse",
    "kd/weighted",
    "loss/total",
]


def require(module: str | None = None, executable: str | None = None) -> None:
    """Skip when a Python module or a program is missing on a developer's machine; in CI
    (CI=true, which `.ci/run` sets, where both are installed) fail instead."""
    missing = module is not None and importlib.util.find_spec(module) is None
    missing = missing or (executable is not None and not Path(executable).exists())
    if not missing:
        return
    what = module or executable
    reason = f"{what} is not installed (pip install 'samkd[view,test]'; apt-get install chromium)"
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI must run the view's tests: {reason}")
    pytest.skip(reason)


def training_records(steps: range) -> list[dict[str, Any]]:
    """A log as `samkd train` writes it: training records with every loss term and the
    run's other numbers, validation records, and non-numeric entries."""
    records: list[dict[str, Any]] = []
    for step in steps:
        losses = {term: 1.0 / (step + index) for index, term in enumerate(TERMS)}
        numbers = {"lr": 1e-3 / step, "lambda_kd": 1.0, "images_per_s": 2.0, "skipped_steps": 0}
        records.append({"kind": "train", "step": step, "epoch": 0, **numbers, **losses})
        if step % 2 == 0:
            records.append(
                {
                    "kind": "val",
                    "step": step,
                    "val/miou": 0.1 * step,
                    "val/kd_loss": 2.0 / step,
                    "lambda_kd": 1.0,
                }
            )
    records[-1]["lambda_kd_change"] = [1.0, 0.5]
    return records


def write_log(run: Path, records: list[dict[str, Any]]) -> None:
    with (run / "metrics.jsonl").open("a") as log:
        log.write("".join(json.dumps(record) + "\n" for record in records))


def write_run(folder: Path, model_type: str, seed: int, *assignments: str) -> Path:
    """A finished run folder: its settings, random weights and a training log."""
    folder.mkdir(parents=True)
    settings = load_settings(
        None,
        [f"student.model_type={model_type}", f"data.image_size={IMAGE_SIZE}", *assignments],
        environ={},
    )
    (folder / "settings.yaml").write_text(settings.to_yaml())
    torch.manual_seed(seed)
    save_state_dict(build_sam(model_type, image_size=IMAGE_SIZE), folder / "student.pt")
    write_log(folder, training_records(range(1, 5)))
    return folder


@pytest.fixture(scope="package")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_shapes_dataset(tmp_path_factory.mktemp("data") / "shapes", 3, (96, 128), seed=3)


@pytest.fixture(scope="package")
def teacher_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_run(tmp_path_factory.mktemp("runs") / "teacher", TEACHER, seed=1)


@pytest.fixture(scope="package")
def student_run(tmp_path_factory: pytest.TempPathFactory, teacher_run: Path) -> Path:
    """A student run that names its teacher (`t`) in its settings, as distillation runs do."""
    teacher = f"teachers=[{{name: t, model_type: {TEACHER}, checkpoint: {teacher_run}/student.pt}}]"
    return write_run(tmp_path_factory.mktemp("runs") / "student", STUDENT, 0, teacher)


@pytest.fixture(scope="package")
def models(student_run: Path, teacher_run: Path) -> list[LoadedModel]:
    """The student and the teacher, loaded as `samkd view STUDENT_RUN TEACHER_RUN` does."""
    settings = load_settings(None, [], environ={})
    specs = model_sources([student_run, teacher_run], None, None, settings)
    return [load_model(spec, torch.device("cpu")) for spec in specs]
