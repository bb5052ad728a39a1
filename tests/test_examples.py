"""The settings files under examples/ load, say what their README says, and match the CLI."""

import json
import re
import shlex
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from typer.testing import CliRunner

from samkd.cli import app
from samkd.data import build_dataset
from samkd.demo.shapes import write_shapes_dataset
from samkd.distill import DistillationObjective
from samkd.features import FeatureStore, read_decoder_state_dict
from samkd.models import available_taps, build_sam, load_state_dict_file, save_state_dict
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
    "domain_teacher",
    "sam2_teacher",
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


def test_sam2_teacher_recipe(tmp_path: Path) -> None:
    settings = load_example(EXAMPLES / "sam2_teacher" / "settings.yaml", tmp_path)
    assert [(t.model_type, t.frame) for t in settings.teachers] == [("sam2.1_hiera_b+", "auto")]
    assert settings.student.model_type == "vit_t" and settings.student.decoder_from is None
    assert enabled_terms(settings) == {"encoder", "decoder"}
    # The decoder terms run SAM 2's decoder from the file: it needs the high-resolution maps.
    assert settings.extract.high_res and settings.distillation.use_precomputed_features
    assert settings.extract.output == settings.distillation.features
    assert settings.extract.pseudo_masks.enabled
    assert settings.data.prompts.unlabelled == "teacher_masks"
    readme = (EXAMPLES / "sam2_teacher" / "README.md").read_text()
    assert "estimates: no GPU has run this yet" in readme
    assert f"--teacher {settings.teachers[0].name}" in readme


DOMAIN = EXAMPLES / "domain_teacher"


def test_domain_teacher_stages_fit_together(tmp_path: Path) -> None:
    teacher = load_example(DOMAIN / "teacher.yaml", tmp_path / "a")
    distil = load_example(DOMAIN / "settings.yaml", tmp_path / "b")
    # Stage 1: plain fine-tuning of SAM ViT-B from the released weights.
    assert teacher.student.model_type == "vit_b" and not teacher.teachers
    assert teacher.student.checkpoint is not None and teacher.train.task_loss
    assert teacher.train.lr_scale.image_encoder < 1
    # Stages 2-3: its best checkpoint is the teacher; MobileSAM learns its embedding and
    # starts from its decoder.
    raw = yaml.safe_load((DOMAIN / "settings.yaml").read_text())
    best = teacher.train.output_dir / "checkpoints" / "best.pt"
    assert Path(raw["teachers"][0]["checkpoint"]) == best
    assert [t.model_type for t in distil.teachers] == ["vit_b"]
    assert distil.student.model_type == "vit_t" and distil.student.checkpoint is not None
    assert distil.student.decoder_from == distil.teachers[0].name
    assert distil.distillation.use_precomputed_features
    assert distil.extract.output == distil.distillation.features
    assert enabled_terms(distil) == {"encoder"}
    raw_teacher = yaml.safe_load((DOMAIN / "teacher.yaml").read_text())
    assert raw_teacher["data"]["val"] == raw["data"]["val"]


# The README's command of each stage; `run_stage` adds the small presets (teacher vit_mini for
# vit_b, student vit_t_mini for vit_t) at 64 px for 2 steps on the CPU.
DOMAIN_STAGES = {
    "teacher": ["train", "--config", "examples/domain_teacher/teacher.yaml"],
    "extract": ["extract", "--config", "examples/domain_teacher/settings.yaml"],
    "student": ["train", "--config", "examples/domain_teacher/settings.yaml"],
    "eval": [
        "eval", "--config", "examples/domain_teacher/settings.yaml",
        "--checkpoint", "runs/domain_teacher/student/student.pt",
        "--teacher", "domain_vit_b", "--json", "runs/domain_teacher/eval.json",
    ],
}  # fmt: skip
SMALL = {
    "data.image_size": "64",
    "data.num_workers": "0",
    "train.steps": "2",
    "train.batch_size": "2",
    "train.warmup_steps": "0",
    "train.device": "cpu",
    "extract.device": "cpu",
    "extract.dtype": "float32",
    "eval.device": "cpu",
    "eval.speed": "false",
    "logging.tensorboard": "false",
    "logging.log_every": "1",
}
STAGE_SETTINGS = {
    # A learning rate that visibly moves the encoder in 2 steps, despite its lower scale.
    "teacher": {"student.model_type": "vit_mini", "train.lr": "0.01"},
    "extract": {"teachers.0.model_type": "vit_mini"},
    "student": {"teachers.0.model_type": "vit_mini", "student.model_type": "vit_t_mini"},
    "eval": {"teachers.0.model_type": "vit_mini", "student.model_type": "vit_t_mini"},
}
RELEASED_TEACHER = Path("checkpoints/sam_vit_b_01ec64.pth")


def run_stage(name: str) -> None:
    arguments = [*DOMAIN_STAGES[name]]
    arguments[2] = str(EXAMPLES.parent / arguments[2])  # the settings file, from anywhere
    for key, value in {**SMALL, **STAGE_SETTINGS[name]}.items():
        arguments += ["--set", f"{key}={value}"]
    result = runner.invoke(app, arguments)
    assert result.exit_code == 0, f"{name}: {result.output}"


def write_domain_files(root: Path) -> None:
    """What the README asks for, in small: labelled images, all images (the labelled ones
    and two without masks), validation images, and the two released checkpoints."""
    data = root / "data" / "my_domain"
    labelled = write_shapes_dataset(data / "labelled", 4, (96, 128), seed=0)
    write_shapes_dataset(data / "val", 2, (96, 128), seed=1)
    shutil.copytree(labelled, data / "train")
    unlabelled = write_shapes_dataset(root / "more", 2, (96, 128), seed=2)
    for image in (unlabelled / "image").iterdir():
        shutil.copy(image, data / "train" / "image" / f"unlabelled_{image.name}")
    (root / "checkpoints").mkdir()
    torch.manual_seed(0)
    save_state_dict(build_sam("vit_mini"), root / RELEASED_TEACHER)
    save_state_dict(build_sam("vit_t_mini"), root / "checkpoints" / "mobile_sam.pt")


def part(weights: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {key: value for key, value in weights.items() if key.startswith(prefix)}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def test_domain_teacher_recipe_runs_on_the_presets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    readme = (DOMAIN / "README.md").read_text()
    for command in DOMAIN_STAGES.values():
        assert shlex.join(["samkd", *command[:3]]) in readme
    monkeypatch.chdir(tmp_path)
    write_domain_files(tmp_path)
    released = load_state_dict_file(RELEASED_TEACHER)

    # 1. Fine-tune the teacher: the encoder and decoder move, the prompt encoder does not. Its
    # best.pt, a training checkpoint, is the teacher of the next stages.
    run_stage("teacher")
    teacher_path = Path("runs/domain_teacher/teacher/checkpoints/best.pt")
    tuned = load_state_dict_file(teacher_path)
    assert not same(part(tuned, "image_encoder."), part(released, "image_encoder."))
    assert not same(part(tuned, "mask_decoder."), part(released, "mask_decoder."))
    assert same(part(tuned, "prompt_encoder."), part(released, "prompt_encoder."))

    # 2. Extract: every domain image (those without masks too), embedded by the fine-tuned
    # teacher, not the released one.
    run_stage("extract")
    features = Path("features/my_domain_vit_b.h5")
    store = FeatureStore(features)
    assert len(store) == 6
    dataset = build_dataset("data/my_domain/train", layout="folder", image_size=64)
    sample = next(s for s in (dataset[i] for i in range(len(dataset))) if not len(s.masks))
    stored = store.read(sample.image_id)["domain_vit_b"]["encoder.embed"]
    embeddings = {}
    for name, checkpoint in ("tuned", teacher_path), ("released", RELEASED_TEACHER):
        model = build_sam("vit_mini", image_size=64, checkpoint=checkpoint)
        with torch.inference_mode():
            embeddings[name] = model.image_encoder(sample.image[None])[0]
    torch.testing.assert_close(stored, embeddings["tuned"], rtol=1e-4, atol=1e-4)
    assert (stored - embeddings["released"]).abs().max() > 1e-2
    decoder = read_decoder_state_dict(features, "domain_vit_b")
    assert same(part(decoder, "mask_decoder."), part(tuned, "mask_decoder."))

    # 3. Distil MobileSAM: its encoder learns, its decoder is the tuned teacher's (frozen at
    # first), and the exported weights load.
    run_stage("student")
    exported = Path("runs/domain_teacher/student/student.pt")
    student = build_sam("vit_t_mini", image_size=64, checkpoint=exported).state_dict()
    initial = load_state_dict_file("checkpoints/mobile_sam.pt")
    assert not same(part(student, "image_encoder."), part(initial, "image_encoder."))
    assert same(part(student, "mask_decoder."), part(tuned, "mask_decoder."))
    metrics = Path("runs/domain_teacher/student/metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in metrics]
    trained = next(r for r in records if r["kind"] == "train")
    assert trained["kd/domain_vit_b/encoder_mse"] > 0 and trained["task/total"] > 0

    # 4. Evaluate the student beside its teacher.
    run_stage("eval")
    report = json.loads(Path("runs/domain_teacher/eval.json").read_text())
    assert report["dataset"]["images"] == 2
    assert Path(report["model"]["checkpoint"]) == exported
    assert Path(report["teacher"]["checkpoint"]) == teacher_path
    for kind in ("quality", "teacher_quality", "agreement"):
        assert 0 <= report[kind]["box"]["single"]["miou"] <= 1
