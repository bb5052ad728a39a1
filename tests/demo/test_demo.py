"""The demo at its smallest size: every command runs and every artifact is written."""

import json
import shutil
from pathlib import Path

import h5py
import pytest
import yaml
from rich.console import Console

from samkd.demo.run import (
    FAST,
    PACKAGE,
    Paths,
    run_demo,
    teacher_key,
    train_teacher,
    training_code_digest,
)

RUNS = ("teacher", "student-no-kd", "student-kd")


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    workdir = tmp_path_factory.mktemp("demo")
    return workdir, run_demo(workdir, fast=True)


def test_datasets(demo: tuple[Path, dict]) -> None:
    workdir, _ = demo
    sizes = {"train": FAST.train_images, "test": FAST.test_images}
    for split, count in sizes.items():
        images = sorted((workdir / "data" / split / "image").glob("*.png"))
        assert len(images) == count
        assert any((workdir / "data" / split / "mask").iterdir())


def test_settings_files_load(demo: tuple[Path, dict]) -> None:
    workdir, _ = demo
    student = yaml.safe_load((workdir / "student.yaml").read_text())
    teacher = yaml.safe_load((workdir / "teacher.yaml").read_text())
    assert teacher["student"]["model_type"] == "vit_mini"
    assert "teachers" not in teacher
    assert student["student"]["model_type"] == "vit_t_mini"
    assert student["teachers"][0]["checkpoint"] == str(workdir / "teacher" / "student.pt")


def test_feature_file(demo: tuple[Path, dict]) -> None:
    workdir, _ = demo
    with h5py.File(workdir / "features.h5", "r") as file:
        assert len(file["images/ids"]) == FAST.train_images
        assert "encoder.embed" in file["teachers/teacher/taps"]


def test_runs(demo: tuple[Path, dict]) -> None:
    workdir, _ = demo
    for run in RUNS:
        assert (workdir / run / "student.pt").is_file()
        records = [json.loads(line) for line in (workdir / run / "metrics.jsonl").open()]
        assert any(record["kind"] == "train" for record in records)
    distilled = (workdir / "student-kd" / "metrics.jsonl").read_text()
    baseline = (workdir / "student-no-kd" / "metrics.jsonl").read_text()
    assert "encoder_mse" in distilled
    assert "encoder_mse" not in baseline


def test_eval_reports(demo: tuple[Path, dict]) -> None:
    workdir, _ = demo
    for run in RUNS:
        report = json.loads((workdir / "eval" / f"{run}.json").read_text())
        assert report["dataset"]["images"] == FAST.test_images
        assert 0 <= report["quality"]["box"]["single"]["miou"] <= 1


def test_summary(demo: tuple[Path, dict]) -> None:
    workdir, returned = demo
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary == returned
    assert set(summary["miou"]) == set(RUNS)
    assert summary["gain"] == pytest.approx(
        summary["miou"]["student-kd"] - summary["miou"]["student-no-kd"]
    )
    assert summary["distillation_helped"] == (summary["gain"] > 0)
    assert summary["verdict"]
    assert not summary["teacher_cached"]
    assert len(summary["commands"]) == 7
    assert all(command.startswith("samkd ") for command in summary["commands"])


def test_rerun_reuses_the_teacher(demo: tuple[Path, dict]) -> None:
    workdir, _ = demo
    commands: list[str] = []
    trained = train_teacher(Paths(workdir), Console(), commands)
    assert not trained
    assert commands == [json.loads((workdir / "summary.json").read_text())["commands"][0]]


def test_teacher_retrained_when_its_settings_change(demo: tuple[Path, dict]) -> None:
    workdir, _ = demo
    paths = Paths(workdir)
    key = teacher_key(paths)
    original = paths.teacher_config.read_text()
    paths.teacher_config.write_text(original.replace("lr:", "lr: 0.5 #"))
    try:
        assert teacher_key(paths) != key
    finally:
        paths.teacher_config.write_text(original)
    assert teacher_key(paths) == key


def test_teacher_key_follows_the_training_code(tmp_path: Path) -> None:
    """A cached teacher is one the current code would train: editing the training code changes
    the key, editing code that does not train (evaluation) does not."""
    package = tmp_path / "samkd"
    shutil.copytree(PACKAGE, package, ignore=shutil.ignore_patterns("__pycache__"))
    digest = training_code_digest(package)
    loss = package / "train" / "task_loss.py"
    loss.write_text(loss.read_text().replace("focal: float = 20.0", "focal: float = 19.0"))
    assert training_code_digest(package) != digest
    loss.write_text(loss.read_text().replace("focal: float = 19.0", "focal: float = 20.0"))
    assert training_code_digest(package) == digest
    metrics = package / "evaluate" / "metrics.py"
    metrics.write_text(metrics.read_text() + "\n# a comment\n")
    assert training_code_digest(package) == digest
