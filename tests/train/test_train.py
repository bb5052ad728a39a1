"""Training runs on the small presets: both teacher modes, resume, export, NaN guard, DDP."""

import math
import os
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import h5py
import mobile_sam
import pytest
import torch
from typer.testing import CliRunner

from samkd.cli import app
from samkd.errors import UsageError
from samkd.extract import run_extract
from samkd.inspect import summarize_checkpoint
from samkd.models import build_sam, load_state_dict_file
from samkd.runtime import Distributed
from samkd.settings import SettingsError
from samkd.train import run_train, setup
from samkd.train.metrics_log import read_metrics
from samkd.train.progress import NonFiniteLossError
from samkd.train.state import load_checkpoint

from ..conftest import EmptyMaskRun
from .conftest import ALL_TERMS, STUDENT, base_assignments, make_settings

# Wall-clock and throughput fields differ between any two runs.
TIMING_FIELDS = {"images_per_s"}


def loss_records(run_dir: Path) -> list[dict]:
    return [
        {k: v for k, v in record.items() if k not in TIMING_FIELDS}
        for record in read_metrics(run_dir / "metrics.jsonl")
    ]


def first_train_record(run_dir: Path) -> dict:
    return next(r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train")


def test_precomputed_equals_online_on_a_batch(
    tmp_path: Path, shapes: Path, teacher_checkpoint: Path, feature_file: Path
) -> None:
    common = [*base_assignments(shapes, teacher_checkpoint, tmp_path), *ALL_TERMS]
    common += ["train.steps=1", "train.lr=1e-12"]
    stored = make_settings(*common, f"distillation.features={feature_file}")
    stored.train.output_dir = tmp_path / "stored"
    run_train(stored)
    online = make_settings(*common, "distillation.use_precomputed_features=false")
    online.train.output_dir = tmp_path / "online"
    run_train(online)
    from_file = first_train_record(tmp_path / "stored")
    computed = first_train_record(tmp_path / "online")
    terms = [name for name in computed if name.startswith(("kd/t/", "task/"))]
    assert {"kd/t/encoder_mse", "kd/t/decoder_kl", "kd/t/attention_kl", "kd/t/rkd_angle"} <= set(
        terms
    )
    for name in terms:
        assert from_file[name] == pytest.approx(computed[name], rel=1e-4, abs=1e-6), name


def test_short_run_lowers_distillation_loss(
    tmp_path: Path, shapes: Path, teacher_checkpoint: Path, feature_file: Path
) -> None:
    settings = make_settings(
        *base_assignments(shapes, teacher_checkpoint, tmp_path / "run"),
        f"distillation.features={feature_file}",
        "train.steps=24",
        "logging.log_every=4",
    )
    result = run_train(settings)
    records = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "train"]
    assert result.steps == 24
    assert records[-1]["kd/t/encoder_mse"] < 0.8 * records[0]["kd/t/encoder_mse"]


def test_online_run_with_two_teachers_logs_every_term(
    tmp_path: Path, shapes: Path, teacher_checkpoint: Path
) -> None:
    settings = make_settings(
        *base_assignments(shapes, teacher_checkpoint, tmp_path / "run"),
        *ALL_TERMS,
        f"teachers=[{{name: big, model_type: vit_mini, checkpoint: {teacher_checkpoint}}}, "
        f"{{name: small, model_type: {STUDENT}, weight: 0.5}}]",
        "distillation.use_precomputed_features=false",
        "train.steps=2",
    )
    run_train(settings)
    record = first_train_record(tmp_path / "run")
    for teacher in ("big", "small"):
        for term in ("encoder_mse", "encoder_kl", "decoder_mse", "decoder_cosine", "decoder_kl"):
            assert f"kd/{teacher}/{term}" in record
        for term in ("attention_kl", "rkd_distance", "rkd_angle"):
            assert f"kd/{teacher}/{term}" in record
    assert {"task/focal", "task/dice", "task/iou_mse", "loss/total", "lr", "epoch"} <= set(record)


def test_online_step_with_geometric_augmentation(
    tmp_path: Path, shapes: Path, teacher_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The teacher sees the student's transformed input: recorded at both image encoders."""
    settings = make_settings(
        *base_assignments(shapes, teacher_checkpoint, tmp_path / "run"),
        "distillation.use_precomputed_features=false",
        "distillation.decoder.enabled=true",
        "data.image_size=128",
        "train.steps=1",
        "train.augment.crop_scale=[0.5, 1]",
        "train.augment.scale_jitter=0.25",
        "train.augment.rotate90=true",
    )
    seen: dict[str, list[torch.Tensor]] = {"student": [], "teacher": []}

    def hook(role: str, model: torch.nn.Module) -> None:
        model.image_encoder.register_forward_pre_hook(
            lambda module, inputs: seen[role].append(inputs[0].detach().clone())
        )

    build_student, build_distillation = setup.build_student, setup.build_distillation

    def recorded_student(*args: object, **kwargs: object) -> torch.nn.Module:
        student = build_student(*args, **kwargs)
        hook("student", student)
        return student

    def recorded_teachers(*args: object, **kwargs: object) -> object:
        objective, store, teachers = build_distillation(*args, **kwargs)
        for teacher in teachers:
            hook("teacher", teacher.model)
        return objective, store, teachers

    monkeypatch.setattr(setup, "build_student", recorded_student)
    monkeypatch.setattr(setup, "build_distillation", recorded_teachers)
    run_train(settings)
    (teacher_input,) = seen["teacher"]  # the step's batch (the student also ran a probe)
    assert torch.equal(teacher_input, seen["student"][-1])
    plain = setup.build_train_dataset(settings)
    indices = next(setup.step_batches(8, settings, 0, 0, Distributed()))
    untransformed = torch.stack([plain[index].image for index in indices])
    assert not torch.equal(teacher_input, untransformed)
    record = first_train_record(tmp_path / "run")
    terms = {name: value for name, value in record.items() if name.startswith(("kd/", "task/"))}
    assert {"kd/t/encoder_mse", "kd/t/decoder_kl", "task/focal"} <= set(terms)
    assert all(math.isfinite(value) for value in terms.values())


def test_validation_best_checkpoint_and_dynamic_weight(
    tmp_path: Path, shapes: Path, shapes_val: Path, teacher_checkpoint: Path, feature_file: Path
) -> None:
    settings = make_settings(
        *base_assignments(shapes, teacher_checkpoint, tmp_path / "run"),
        f"distillation.features={feature_file}",
        f"data.val={shapes_val}",
        "train.steps=6",
        "train.val_every=2",
        "distillation.dynamic_lambda.enabled=true",
        "distillation.dynamic_lambda.patience=0",
        "distillation.dynamic_lambda.threshold=1.0",  # no evaluation can improve by 1.0 mIoU
    )
    run_train(settings)
    val = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "val"]
    assert [r["step"] for r in val] == [2, 4, 6]
    assert all(0.0 <= r["val/miou"] <= 1.0 for r in val)
    assert val[-1]["lambda_kd"] < 1.0
    assert any("lambda_kd_change" in r for r in val)
    assert (tmp_path / "run" / "checkpoints" / "best.pt").exists()


def test_validation_reports_the_share_of_empty_masks(empty_mask_run: EmptyMaskRun) -> None:
    (val,) = [
        r for r in read_metrics(empty_mask_run.folder / "metrics.jsonl") if r["kind"] == "val"
    ]
    assert val["val/empty_fraction"] == 1.0 and val["val/miou"] == 0.0
    assert empty_mask_run.warnings == [
        "the model predicts empty masks for 100% of objects (validation at step 1): "
        "undertrained or wrong input scale?"
    ]


def test_exported_student_loads_strictly(
    tmp_path: Path, shapes: Path, teacher_checkpoint: Path, feature_file: Path
) -> None:
    settings = make_settings(
        *base_assignments(shapes, teacher_checkpoint, tmp_path / "run"),
        f"distillation.features={feature_file}",
        "train.steps=1",
    )
    result = run_train(settings)
    assert result.exported is not None
    exported = load_state_dict_file(result.exported)
    assert not any("adapter" in key or key.startswith("objective") for key in exported)
    build_sam(STUDENT, checkpoint=result.exported)


def test_lora_trains_only_the_adapters_and_exports_them_merged(
    tmp_path: Path, shapes: Path, teacher_checkpoint: Path, feature_file: Path
) -> None:
    assignments = [
        *base_assignments(shapes, teacher_checkpoint, tmp_path / "run"),
        f"distillation.features={feature_file}",
        "distillation.decoder.enabled=true",
        "train.steps=2",
    ]
    initial = setup.build_student(make_settings(*assignments), torch.device("cpu")).state_dict()
    torch.save(initial, tmp_path / "initial.pt")
    settings = make_settings(
        *assignments, f"student.checkpoint={tmp_path / 'initial.pt'}", "student.lora.rank=4"
    )
    result = run_train(settings)
    trained = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["model"]
    student = {
        key.removeprefix("student.").replace(".base_layer.", "."): value
        for key, value in trained.items()
        if key.startswith("student.")
    }
    adapters = {key: value for key, value in student.items() if "lora_" in key}
    plain = {key: value for key, value in student.items() if "lora_" not in key}
    assert plain.keys() == initial.keys()
    assert all(torch.equal(plain[key], initial[key]) for key in initial)
    # B starts at 0: the adapters have learnt something only if it moved.
    assert any(value.abs().sum() > 0 for key, value in adapters.items() if "lora_B" in key)
    assert result.exported is not None
    exported = build_sam(STUDENT, checkpoint=result.exported).state_dict()
    changed = {key for key in initial if not torch.equal(exported[key], initial[key])}
    assert changed and all(key.endswith(("qkv.weight", "proj.weight")) for key in changed)
    # The training checkpoint reads as the same merged weights (e.g. as a teacher).
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    from_checkpoint = build_sam(STUDENT, checkpoint=last)
    assert all(torch.equal(from_checkpoint.state_dict()[key], exported[key]) for key in exported)
    summary = summarize_checkpoint(last)
    assert summary["lora_parameters"] == sum(value.numel() for value in adapters.values())
    assert summary["total_parameters"] == sum(value.numel() for value in initial.values())


def test_full_size_export_loads_into_upstream_mobile_sam(tmp_path: Path) -> None:
    settings = make_settings("student.model_type=vit_t")
    student = setup.build_student(settings, torch.device("cpu"))
    path = tmp_path / "mobile_sam.pt"
    torch.save(student.state_dict(), path)
    upstream = mobile_sam.sam_model_registry["vit_t"]()
    upstream.load_state_dict(torch.load(path, weights_only=True), strict=True)


def test_resume_after_sigkill_reproduces_log(
    tmp_path: Path, shapes: Path, teacher_checkpoint: Path, feature_file: Path
) -> None:
    """A LoRA run with a part trained in full, killed between checkpoints (a full run's
    resume is in tests/train/test_conditions.py)."""
    assignments = [
        *base_assignments(shapes, teacher_checkpoint, tmp_path / "killed"),
        f"distillation.features={feature_file}",
        "distillation.rkd.enabled=true",
        "distillation.rkd.patches=sample",
        "student.lora.rank=4",
        "student.lora.dropout=0.1",
        "student.lora.train_parts=[mask_decoder]",
        "train.steps=12",
        "train.checkpoint_every=3",
        "train.augment.flip=0.5",
        "train.augment.brightness=0.1",
    ]
    killed_config = tmp_path / "killed.yaml"
    killed_config.write_text(make_settings(*assignments).to_yaml())
    reference_config = tmp_path / "reference.yaml"
    reference = make_settings(*assignments)
    reference.train.output_dir = tmp_path / "reference"
    reference_config.write_text(reference.to_yaml())
    # The default thread count: CPU training is deterministic (tests/train/test_determinism.py).
    environment = dict(os.environ)
    train = [sys.executable, "-m", "samkd", "train"]
    process = subprocess.Popen(
        [*train, "--config", str(killed_config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=environment,
    )
    checkpoint = tmp_path / "killed" / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if checkpoint.exists() and load_checkpoint(checkpoint)["progress"]["step"] >= 6:
            break
        time.sleep(0.05)
    assert process.poll() is None, "training finished before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    for command in (
        [*train, "--resume", str(tmp_path / "killed")],
        [*train, "--config", str(reference_config)],
    ):
        completed = subprocess.run(command, capture_output=True, text=True, env=environment)
        assert completed.returncode == 0, completed.stderr[-2000:]
    killed = loss_records(tmp_path / "killed")
    assert [record["step"] for record in killed] == list(range(1, 13))
    assert killed == loss_records(tmp_path / "reference")


def test_nonfinite_steps_are_skipped_then_abort(
    tmp_path: Path, shapes: Path, teacher_checkpoint: Path, feature_file: Path
) -> None:
    broken = tmp_path / "broken.h5"
    broken.write_bytes(feature_file.read_bytes())
    settings = make_settings(
        *base_assignments(shapes, teacher_checkpoint, tmp_path / "run"),
        f"distillation.features={broken}",
        "train.steps=8",
        "train.checkpoint_every=1",
        "train.max_nonfinite_steps=2",
    )
    # The images of steps 2 and 3 (0-based) get NaN teacher embeddings.
    batches = list(setup.step_batches(8, settings, 0, 0, Distributed()))
    with h5py.File(broken, "r+") as handle:
        embed = handle["teachers/t/taps/encoder.embed"]
        checksums = handle["teachers/t/crc32/encoder.embed"]
        for index in batches[2] + batches[3]:
            embed[index] = float("nan")  # as `extract.allow_nonfinite` stores them
            checksums[index] = zlib.crc32(embed[index].tobytes())
    with pytest.raises(NonFiniteLossError, match=r"2 consecutive steps.*kd/t/encoder_mse"):
        run_train(settings)
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    # Step 2 was skipped on the device (no update) and checkpointed after it; the second
    # skipped step in a row (3) is noticed at the logging step after it, which aborts the run
    # before it saves.
    assert state["progress"]["step"] == 3
    assert state["progress"]["skipped_total"] == 1
    assert state["progress"]["longest_skipped_run"] == 1
    records = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["skipped_steps"] for r in records] == [0, 0, 1, 2]
    assert "kd/t/encoder_mse" in records[-1]["nonfinite_terms"]
    weights = [v for v in state["model"].values() if torch.is_tensor(v) and v.is_floating_point()]
    assert all(torch.isfinite(weight).all() for weight in weights)


def test_settings_errors_are_one_line(tmp_path: Path, shapes: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["train", "--set", "train.batch_sise=2"])
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        "error: --set train.batch_sise=2: unknown key 'train.batch_sise'; did you mean "
        "'batch_size'?"
    )
    result = runner.invoke(
        app,
        [
            "train",
            "--set", f"data.train={shapes}",
            "--set", "teachers=[{name: t, model_type: vit_mini}]",
            "--set", f"train.output_dir={tmp_path}",
        ],
    )  # fmt: skip
    assert result.exit_code == 1
    assert result.stderr.strip().startswith("error: precomputed distillation needs a feature")
    result = runner.invoke(
        app,
        ["train", "--set", f"data.train={shapes}", "--set", "train.batch_size=3",
         "--set", "train.grad_accumulation=2", "--set", f"train.output_dir={tmp_path}"],
    )  # fmt: skip
    assert result.exit_code == 2
    assert "must be divisible by train.grad_accumulation 2" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_refuses_to_overwrite_a_run(
    tmp_path: Path, shapes: Path, teacher_checkpoint: Path, feature_file: Path
) -> None:
    settings = make_settings(
        *base_assignments(shapes, teacher_checkpoint, tmp_path / "run"),
        f"distillation.features={feature_file}",
        "train.steps=1",
    )
    run_train(settings)
    with pytest.raises(UsageError, match="already holds a run; resume it"):
        run_train(settings)


def test_teachers_with_their_own_taps_and_pairs(
    tmp_path: Path, shapes: Path, teacher_checkpoint: Path
) -> None:
    teachers = (
        f"teachers=[{{name: a, model_type: vit_mini, checkpoint: {teacher_checkpoint}}}, "
        f"{{name: b, model_type: {STUDENT}, taps: [encoder.embed, encoder.qk.2], "
        "attention_pairs: [{student: encoder.qk.3, teacher: encoder.qk.2}]}]"
    )
    features = tmp_path / "two.h5"
    common = [
        *base_assignments(shapes, teacher_checkpoint, tmp_path / "run"),
        teachers,
        "extract.taps=[encoder.embed, encoder.qk.3]",
        f"distillation.features={features}",
        "distillation.attention.enabled=true",
        "train.steps=1",
    ]
    run_extract(make_settings(*common, f"extract.output={features}"))
    run_train(make_settings(*common))
    record = first_train_record(tmp_path / "run")
    assert {"kd/a/attention_kl", "kd/b/attention_kl"} <= set(record)


def test_task_loss_can_be_switched_off(
    tmp_path: Path, shapes: Path, teacher_checkpoint: Path, feature_file: Path
) -> None:
    settings = make_settings(
        *base_assignments(shapes, teacher_checkpoint, tmp_path / "run"),
        f"distillation.features={feature_file}",
        "train.task_loss=false",
        "train.steps=1",
    )
    run_train(settings)
    record = first_train_record(tmp_path / "run")
    assert not any(name.startswith("task/") for name in record)
    assert record["loss/total"] == pytest.approx(record["kd/weighted"])


def test_dynamic_weight_on_validation_kd_loss_and_inherited_decoder(
    tmp_path: Path, shapes: Path, shapes_val: Path, teacher_checkpoint: Path
) -> None:
    settings = make_settings(
        *base_assignments(shapes, teacher_checkpoint, tmp_path / "run"),
        "distillation.use_precomputed_features=false",
        f"data.val={shapes_val}",
        "student.decoder_from=t",
        "train.steps=4",
        "train.val_every=2",
        "distillation.dynamic_lambda.enabled=true",
        "distillation.dynamic_lambda.metric=val/kd_loss",
        "distillation.dynamic_lambda.mode=min",
    )
    run_train(settings)
    val = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "val"]
    assert len(val) == 2 and all(r["val/kd_loss"] > 0 for r in val)
    student = setup.build_student(settings, torch.device("cpu"))
    teacher = load_state_dict_file(teacher_checkpoint)
    inherited = student.state_dict()
    for key in ("mask_decoder.iou_token.weight", "prompt_encoder.point_embeddings.0.weight"):
        assert torch.equal(inherited[key], teacher[key])


def test_kd_loss_metric_needs_teacher_features(
    tmp_path: Path, shapes: Path, shapes_val: Path, teacher_checkpoint: Path, feature_file: Path
) -> None:
    with pytest.raises(SettingsError, match="val/kd_loss needs online teachers or"):
        make_settings(
            *base_assignments(shapes, teacher_checkpoint, tmp_path / "run"),
            f"distillation.features={feature_file}",
            f"data.val={shapes_val}",
            "distillation.dynamic_lambda.enabled=true",
            "distillation.dynamic_lambda.metric=val/kd_loss",
        )
