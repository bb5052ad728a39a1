"""The settings files under examples/ load, say what their README says, and match the CLI."""

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from samkd.cli import app
from samkd.distill import DistillationObjective
from samkd.models import available_taps, build_sam
from samkd.settings import Settings, load_settings

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SETTINGS_FILES = sorted(EXAMPLES.glob("*/*.yaml"))
FOLDERS = [
    "mobilesam_recipe",
    "finetune_all_terms",
    "finetune_online",
    "multi_gpu",
    "cpu_demo",
    "label_free",
]
runner = CliRunner()


def example_id(path: Path) -> str:
    return str(path.relative_to(EXAMPLES))


def path_assignments(raw: dict[str, Any], tmp_path: Path) -> list[str]:
    """`--set` assignments pointing the example's user files (data, weights) at temporary ones."""
    assignments = []
    for split in ("train", "val"):
        if raw.get("data", {}).get(split) is not None:
            folder = tmp_path / "data" / split
            folder.mkdir(parents=True, exist_ok=True)
            assignments.append(f"data.{split}={folder}")
    for index, teacher in enumerate(raw.get("teachers", [])):
        if teacher.get("checkpoint") is not None:
            weights = tmp_path / f"teacher{index}.pt"
            weights.touch()
            assignments.append(f"teachers.{index}.checkpoint={weights}")
    if raw.get("student", {}).get("checkpoint") is not None:
        weights = tmp_path / "student.pt"
        weights.touch()
        assignments.append(f"student.checkpoint={weights}")
    return assignments


SUBSTITUTED = {"data.train", "data.val", "student.checkpoint"} | {
    f"teachers.{index}.checkpoint" for index in range(8)
}


def assert_same_values(raw: Any, loaded: Any, where: str = "") -> None:
    """Every value written in the example survives loading unchanged (paths aside)."""
    if where in SUBSTITUTED:
        return
    if isinstance(raw, dict):
        for key, value in raw.items():
            assert_same_values(value, loaded[key], f"{where}.{key}".lstrip("."))
    elif isinstance(raw, list):
        assert len(raw) == len(loaded), where
        for index, (value, got) in enumerate(zip(raw, loaded, strict=True)):
            assert_same_values(value, got, f"{where}.{index}")
    else:
        assert loaded == raw, f"{where}: written {raw!r}, loaded {loaded!r}"


def load_example(path: Path, tmp_path: Path) -> Settings:
    raw = yaml.safe_load(path.read_text())
    return load_settings(path, path_assignments(raw, tmp_path), environ={})


@pytest.mark.parametrize("path", SETTINGS_FILES, ids=example_id)
def test_example_validates_unchanged(path: Path, tmp_path: Path) -> None:
    raw = yaml.safe_load(path.read_text())
    settings = load_example(path, tmp_path)
    assert_same_values(raw, settings.model_dump(mode="json"))


@pytest.mark.parametrize("command", ["extract", "train", "eval"])
@pytest.mark.parametrize("path", SETTINGS_FILES, ids=example_id)
def test_print_config(path: Path, command: str, tmp_path: Path) -> None:
    raw = yaml.safe_load(path.read_text())
    options = [
        item for assignment in path_assignments(raw, tmp_path) for item in ("--set", assignment)
    ]
    result = runner.invoke(app, [command, "--config", str(path), *options, "--print-config"])
    assert result.exit_code == 0, result.output
    printed = yaml.safe_load(result.stdout)
    assert printed == load_example(path, tmp_path).model_dump(mode="json")


@pytest.mark.parametrize("folder", FOLDERS)
def test_folder_has_readme_with_commands(folder: str) -> None:
    readme = EXAMPLES / folder / "README.md"
    assert readme.is_file()
    text = readme.read_text()
    mentioned = set(re.findall(r"examples/[\w/]+\.yaml", text))
    assert mentioned, f"{readme} names no settings file"
    for name in mentioned:
        assert (EXAMPLES.parent / name).is_file(), f"{readme} names missing {name}"


def enabled_terms(settings: Settings) -> set[str]:
    sections = settings.distillation
    return {
        name
        for name in ("encoder", "decoder", "attention", "rkd")
        if getattr(sections, name).enabled and getattr(sections, name).weight > 0
    }


def test_mobilesam_recipe(tmp_path: Path) -> None:
    settings = load_example(EXAMPLES / "mobilesam_recipe" / "settings.yaml", tmp_path)
    assert settings.data.layout == "sa1b"
    assert [(t.model_type, t.weight) for t in settings.teachers] == [("vit_h", 1.0)]
    assert settings.student.model_type == "vit_t"
    assert settings.student.checkpoint is None
    assert settings.student.decoder_from == settings.teachers[0].name
    assert settings.distillation.use_precomputed_features
    assert enabled_terms(settings) == {"encoder"}
    assert settings.distillation.encoder.mse_weight > 0
    assert settings.distillation.encoder.kl_weight == 0
    assert not settings.distillation.dynamic_lambda.enabled
    assert settings.extract.taps == ["encoder.embed"]
    assert settings.extract.output == settings.distillation.features
    assert settings.train.frozen_until == {"prompt_encoder": -1, "mask_decoder": -1}


def test_finetune_all_terms(tmp_path: Path) -> None:
    settings = load_example(EXAMPLES / "finetune_all_terms" / "settings.yaml", tmp_path)
    assert settings.data.layout == "folder"
    assert settings.student.model_type == "vit_t"
    assert settings.student.checkpoint is not None
    assert [t.model_type for t in settings.teachers] == ["vit_h", "vit_t"]
    assert all(t.checkpoint is not None for t in settings.teachers)
    assert len({t.weight for t in settings.teachers}) == 2
    assert enabled_terms(settings) == {"encoder", "decoder", "attention", "rkd"}
    assert settings.distillation.dynamic_lambda.enabled
    assert settings.distillation.use_precomputed_features
    assert settings.extract.output == settings.distillation.features
    assert settings.extract.attention_grid == settings.distillation.attention.grid_size
    pairs = settings.distillation.attention.pairs or []
    assert {pair.teacher for pair in pairs} <= set(settings.extract.taps)
    assert settings.distillation.rkd.tap in settings.extract.taps


def test_finetune_online_is_the_same_recipe_online(tmp_path: Path) -> None:
    stored = load_example(EXAMPLES / "finetune_all_terms" / "settings.yaml", tmp_path / "a")
    online = load_example(EXAMPLES / "finetune_online" / "settings.yaml", tmp_path / "b")
    assert not online.distillation.use_precomputed_features
    assert online.distillation.attention.pairs is None
    assert enabled_terms(online) == enabled_terms(stored)
    assert [(t.name, t.model_type, t.weight) for t in online.teachers] == [
        (t.name, t.model_type, t.weight) for t in stored.teachers
    ]
    assert online.distillation.dynamic_lambda == stored.distillation.dynamic_lambda
    assert online.train.batch_size == stored.train.batch_size


def test_multi_gpu_batch_splits_over_eight_processes(tmp_path: Path) -> None:
    settings = load_example(EXAMPLES / "multi_gpu" / "settings.yaml", tmp_path)
    per_gpu, remainder = divmod(settings.train.batch_size, 8)
    assert remainder == 0 and per_gpu % settings.train.grad_accumulation == 0
    text = (EXAMPLES / "multi_gpu" / "README.md").read_text()
    for command in ("extract", "train"):
        assert f"torchrun --nproc_per_node 8 -m samkd {command} --config" in text


def test_cpu_demo_uses_the_small_presets(tmp_path: Path) -> None:
    teacher = load_example(EXAMPLES / "cpu_demo" / "teacher.yaml", tmp_path / "a")
    demo = load_example(EXAMPLES / "cpu_demo" / "settings.yaml", tmp_path / "b")
    assert teacher.student.model_type == "vit_mini" and not teacher.teachers
    assert [t.model_type for t in demo.teachers] == ["vit_mini"]
    assert demo.student.model_type == "vit_t_mini"
    assert demo.data.image_size == 256
    assert {teacher.train.device, demo.train.device, demo.extract.device} == {"cpu"}
    assert enabled_terms(demo) == {"encoder", "decoder", "attention", "rkd"}
    raw = yaml.safe_load((EXAMPLES / "cpu_demo" / "settings.yaml").read_text())
    assert Path(raw["teachers"][0]["checkpoint"]) == teacher.train.output_dir / "student.pt"


@pytest.mark.parametrize("path", SETTINGS_FILES, ids=example_id)
def test_taps_and_pairs_exist_in_the_models(path: Path, tmp_path: Path) -> None:
    """Every extracted tap and matched pair names a tap that the model really has."""
    settings = load_example(path, tmp_path)
    if not settings.teachers:
        return
    student_taps = set(available_taps(build_sam(settings.student.model_type, device="meta")))
    student_taps.add("encoder.embed")
    objective = DistillationObjective(
        settings.distillation, settings.teachers, settings.student.model_type
    )
    for teacher in settings.teachers:
        teacher_taps = set(available_taps(build_sam(teacher.model_type, device="meta")))
        teacher_taps.add("encoder.embed")
        stored = set(teacher.taps or settings.extract.taps)
        assert stored <= teacher_taps, (teacher.name, stored - teacher_taps)
        needed = set(objective.required_teacher_taps(teacher.name))
        encoder_needed = {tap for tap in needed if tap.startswith("encoder.")}
        assert encoder_needed <= teacher_taps, (teacher.name, encoder_needed - teacher_taps)
        if settings.distillation.use_precomputed_features:
            assert encoder_needed <= stored, (teacher.name, encoder_needed - stored)
    assert set(objective.required_student_taps()) - {"decoder.upscaled", "decoder.mask_logits"} <= (
        student_taps
    )


def test_mobilesam_recipe_trains_on_the_embedding_alone(tmp_path: Path) -> None:
    settings = load_example(EXAMPLES / "mobilesam_recipe" / "settings.yaml", tmp_path)
    assert settings.train.task_loss is False
