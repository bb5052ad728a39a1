"""Settings: precedence, one-line errors, and YAML round trips."""

from pathlib import Path

import pytest

from samkd.settings import (
    DynamicLambdaSettings,
    Settings,
    SettingsError,
    check_micro_batch,
    load_settings,
    set_dotted,
)


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_defaults_are_valid() -> None:
    settings = load_settings(environ={})
    assert settings.student.model_type == "vit_t"
    assert settings.distillation.encoder.enabled
    assert settings.teachers == []


def test_precedence_defaults_file_env_set_flags(tmp_path: Path) -> None:
    config = write(tmp_path / "c.yaml", "train:\n  lr: 0.1\n  steps: 11\n  batch_size: 3\n")
    env = {"SAMKD_TRAIN__LR": "0.2", "SAMKD_TRAIN__STEPS": "22"}

    only_file = load_settings(config, environ={})
    assert (only_file.train.lr, only_file.train.steps) == (0.1, 11)

    with_env = load_settings(config, environ=env)
    assert (with_env.train.lr, with_env.train.steps, with_env.train.batch_size) == (0.2, 22, 3)

    with_set = load_settings(config, ["train.lr=0.3"], environ=env)
    assert (with_set.train.lr, with_set.train.steps) == (0.3, 22)

    with_flag = load_settings(config, ["train.lr=0.3"], {"train.lr": 0.4}, environ=env)
    assert with_flag.train.lr == 0.4
    unset_flag = load_settings(config, ["train.lr=0.3"], {"train.lr": None}, environ=env)
    assert unset_flag.train.lr == 0.3


def test_environment_nested_and_json_lists() -> None:
    env = {
        "SAMKD_DISTILLATION__ENCODER__KL_WEIGHT": "0.5",
        "SAMKD_TEACHERS": '[{"name": "h", "model_type": "vit_h", "weight": 2}]',
        "UNRELATED": "x",
    }
    settings = load_settings(environ=env)
    assert settings.distillation.encoder.kl_weight == 0.5
    assert settings.teachers[0].model_type == "vit_h"
    assert settings.teachers[0].weight == 2


def test_set_addresses_list_items(tmp_path: Path) -> None:
    config = write(
        tmp_path / "c.yaml",
        "teachers:\n  - {name: h, model_type: vit_h}\n  - {name: t, model_type: vit_t}\n",
    )
    settings = load_settings(config, ["teachers.1.weight=0.25"], environ={})
    assert [t.weight for t in settings.teachers] == [1.0, 0.25]
    with pytest.raises(SettingsError, match="no list item 'teachers.5'"):
        load_settings(config, ["teachers.5.weight=1"], environ={})


@pytest.mark.parametrize(
    ("assignment", "expected"),
    [
        ("trian.lr=1", "unknown key 'trian'; did you mean 'train'?"),
        (
            "distillation.encoder.mse_wieght=2",
            "unknown key 'distillation.encoder.mse_wieght'; did you mean 'mse_weight'?",
        ),
        ("train.lr=abc", "train.lr: Input should be a valid number"),
        ("data.image_size=1000", "data.image_size: must be a positive multiple of 64"),
        ("student.model_type=vit_q", "student.model_type: Input should be"),
        ("student.checkpoint=/no/such/file.pt", "student.checkpoint: Path does not point"),
        ("data.train=/no/such/folder", "data.train: folder '/no/such/folder' does not exist"),
        ("train.lr=.inf", "train.lr: Input should be a finite number"),
        ("train.lr=.nan", "train.lr: Input should be a finite number"),
        ("distillation.encoder.temperature=.inf", "temperature: Input should be a finite"),
        ("distillation.rkd.angle_weight=.nan", "angle_weight: Input should be a finite"),
        ("distillation.dynamic_lambda.factor=-.inf", "factor: Input should be a finite"),
        ("train.device=tpu9", "train.device: not a device: expected auto, cpu, cuda or cuda:N"),
        ("extract.device=cuda:x", "extract.device: not a device"),
        ("student.lora.layers=[]", "student.lora.layers: List should have at least 1 item"),
        ("student.lora.parts=[prompt_encoder]", "student.lora.parts.0: Input should be"),
        ("student.lora.dropout=1", "student.lora.dropout: Input should be less than 1"),
        (
            "data.prompts.num_negative_points=1",
            "data.prompts: num_negative_points 1 needs max_points >= 2",
        ),
    ],
)
def test_errors_are_one_line_and_name_the_path(assignment: str, expected: str) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(None, [assignment], environ={})
    message = str(caught.value)
    assert "\n" not in message
    assert expected in message


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    typo = write(tmp_path / "typo.yaml", "train:\n  stepz: 3\n")
    with pytest.raises(SettingsError, match=r"typo\.yaml: unknown key 'train.stepz'; did you mean"):
        load_settings(typo, environ={})
    broken = write(tmp_path / "broken.yaml", "train: [1,\n")
    with pytest.raises(SettingsError, match=r"broken\.yaml.*not valid YAML"):
        load_settings(broken, environ={})
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings(tmp_path / "missing.yaml", environ={})
    scalar = write(tmp_path / "scalar.yaml", "3\n")
    with pytest.raises(SettingsError, match="expected a mapping"):
        load_settings(scalar, environ={})


def test_environment_typo_is_reported() -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(environ={"SAMKD_TRAIN__LRR": "1"})
    assert str(caught.value) == (
        "environment variable SAMKD_TRAIN__LRR: unknown key 'train.lrr'; did you mean 'lr'?"
    )


def test_errors_name_their_source(tmp_path: Path) -> None:
    config = write(tmp_path / "c.yaml", "train:\n  lr: 0.1\n")
    with pytest.raises(SettingsError, match=r"^--set trian.lr=1: unknown key 'trian'"):
        load_settings(config, ["trian.lr=1"], environ={})
    with pytest.raises(SettingsError, match=r"^option: train.steps: Input should be"):
        load_settings(config, [], {"train.steps": "many"}, environ={})
    with pytest.raises(SettingsError, match=r"c\.yaml: train.lr: Input should be greater"):
        write(config, "train:\n  lr: -1\n")
        load_settings(config, environ={})


def test_duplicate_teacher_names_rejected() -> None:
    teachers = '[{"name": "a", "model_type": "vit_h"}, {"name": "a", "model_type": "vit_b"}]'
    env = {"SAMKD_TEACHERS": teachers}
    with pytest.raises(SettingsError) as caught:
        load_settings(environ=env)
    assert str(caught.value) == (
        "environment variable SAMKD_TEACHERS: teachers: names must be unique, 'a' is repeated"
    )


# --------------------------------------------------------------------------- cross-field checks

TEACHER = "teachers=[{name: h, model_type: vit_h}]"


def conflict(tmp_path: Path, *assignments: str, val: bool = False) -> str:
    """The one-line error of settings that contradict each other."""
    extra = [f"data.val={tmp_path}"] if val else []
    with pytest.raises(SettingsError) as caught:
        load_settings(None, [*assignments, *extra], environ={})
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_dynamic_lambda_mode_follows_the_metric() -> None:
    kd_loss = load_settings(None, ["distillation.dynamic_lambda.metric=val/kd_loss"], environ={})
    assert kd_loss.distillation.dynamic_lambda.mode is None
    assert kd_loss.distillation.dynamic_lambda.resolved_mode == "min"
    assert load_settings(environ={}).distillation.dynamic_lambda.resolved_mode == "max"
    # A mode given explicitly wins, where it agrees.
    assert DynamicLambdaSettings(mode="max").resolved_mode == "max"


@pytest.mark.parametrize(
    ("metric", "mode", "expected"),
    [("val/kd_loss", "max", "min"), ("val/miou", "min", "max")],
)
def test_dynamic_lambda_mode_contradicting_the_metric(
    tmp_path: Path, metric: str, mode: str, expected: str
) -> None:
    message = conflict(
        tmp_path,
        f"distillation.dynamic_lambda.metric={metric}",
        f"distillation.dynamic_lambda.mode={mode}",
    )
    assert f"distillation.dynamic_lambda.mode {mode} contradicts" in message
    assert f"distillation.dynamic_lambda.metric {metric}" in message
    assert f"expected mode {expected} or null" in message
    assert message.startswith("--set distillation.dynamic_lambda.")


def test_dynamic_lambda_needs_data_val(tmp_path: Path) -> None:
    message = conflict(tmp_path, TEACHER, "distillation.dynamic_lambda.enabled=true")
    assert "distillation.dynamic_lambda.enabled needs data.val" in message


def test_dynamic_lambda_needs_teachers(tmp_path: Path) -> None:
    message = conflict(tmp_path, "distillation.dynamic_lambda.enabled=true", val=True)
    assert "distillation.dynamic_lambda.enabled needs teachers" in message


def test_kd_loss_metric_needs_validation_features(tmp_path: Path) -> None:
    dynamic = ["distillation.dynamic_lambda.enabled=true", TEACHER]
    message = conflict(
        tmp_path, *dynamic, "distillation.dynamic_lambda.metric=val/kd_loss", val=True
    )
    assert "distillation.dynamic_lambda.metric val/kd_loss needs online teachers or " in message
    assert "distillation.val_features" in message
    online = "distillation.use_precomputed_features=false"
    assert load_settings(
        None,
        [
            *dynamic,
            "distillation.dynamic_lambda.metric=val/kd_loss",
            online,
            f"data.val={tmp_path}",
        ],
        environ={},
    )


def test_dynamic_lambda_factor_one_never_lowers(tmp_path: Path) -> None:
    dynamic = ["distillation.dynamic_lambda.enabled=true", TEACHER]
    message = conflict(tmp_path, *dynamic, "distillation.dynamic_lambda.factor=1", val=True)
    assert "distillation.dynamic_lambda.factor 1 never lowers lambda_kd" in message


def test_dynamic_lambda_min_lambda_not_below_initial(tmp_path: Path) -> None:
    dynamic = ["distillation.dynamic_lambda.enabled=true", TEACHER]
    message = conflict(tmp_path, *dynamic, "distillation.dynamic_lambda.min_lambda=2", val=True)
    assert (
        "distillation.dynamic_lambda.min_lambda 2.0 must be below distillation.dynamic_lambda."
        "initial 1.0"
    ) in message
    # Unused while the schedule is off (the demo's baseline sets initial 0 alone).
    load_settings(None, ["distillation.dynamic_lambda.initial=0"], environ={})


def test_early_stopping_needs_data_val(tmp_path: Path) -> None:
    message = conflict(tmp_path, "train.early_stop_patience=3")
    assert message == (
        "--set train.early_stop_patience=3: train.early_stop_patience 3 needs data.val: it "
        "counts validations; set data.val or early_stop_patience: null"
    )


def test_batch_size_divisible_by_accumulation(tmp_path: Path) -> None:
    message = conflict(tmp_path, "train.batch_size=6", "train.grad_accumulation=4")
    assert message == (
        "--set train.batch_size=6 and --set train.grad_accumulation=4: train.batch_size 6 must "
        "be divisible by train.grad_accumulation 4"
    )


def test_rkd_across_batch_needs_three_images_per_micro_batch(tmp_path: Path) -> None:
    rkd = ["distillation.rkd.enabled=true", "distillation.rkd.across_batch=true"]
    message = conflict(tmp_path, *rkd, "train.batch_size=8", "train.grad_accumulation=4")
    assert "distillation.rkd.across_batch needs at least 3 images per micro-batch" in message
    assert "train.batch_size 8 and train.grad_accumulation 4 give 2" in message
    settings = load_settings(None, [*rkd, "train.batch_size=24"], environ={})
    check_micro_batch(settings, world_size=8)  # 3 per process
    with pytest.raises(SettingsError) as caught:
        check_micro_batch(settings, world_size=12)
    assert "\n" not in str(caught.value)
    assert "train.batch_size 24 over 12 processes and train.grad_accumulation 1 give 2" in str(
        caught.value
    )
    # Per image, or with RKD off, the batch does not matter.
    check_micro_batch(load_settings(None, rkd[:1], environ={}), world_size=2)


def test_attention_grid_must_match_stored_maps(tmp_path: Path) -> None:
    attention = ["distillation.attention.enabled=true", "distillation.attention.grid_size=8"]
    message = conflict(tmp_path, *attention)
    assert "distillation.attention.grid_size 8 must equal extract.attention_grid 16" in message
    load_settings(None, [*attention, "distillation.use_precomputed_features=false"], environ={})


def test_flip_with_stored_attention_maps(tmp_path: Path) -> None:
    flip = ["distillation.attention.enabled=true", "train.augment.flip=0.5"]
    message = conflict(tmp_path, *flip)
    assert "train.augment.flip 0.5 cannot be used with distillation.attention.enabled" in message
    # Online teachers are given the flipped image itself.
    load_settings(None, [*flip, "distillation.use_precomputed_features=false"], environ={})


def test_geometric_augmentation_is_online_only(tmp_path: Path) -> None:
    stored = [TEACHER, f"distillation.features={tmp_path / 'features.h5'}"]
    message = conflict(tmp_path, *stored, "train.augment.scale_jitter=0.2")
    assert message.endswith(
        "train.augment.scale_jitter needs online teachers: stored teacher features are those "
        "of the untransformed image; train with --online (distillation.use_precomputed_features:"
        " false) or switch it off"
    )
    geometric = ["train.augment.crop_scale=0.5", "train.augment.rotate90=true"]
    online = ["distillation.use_precomputed_features=false"]
    augment = load_settings(None, [*stored, *geometric, *online], environ={}).train.augment
    assert augment.crop_scale == (0.5, 1.0) and augment.geometric == ["crop_scale", "rotate90"]
    # Off by default, and a crop of the whole image is off.
    assert load_settings(environ={}).train.augment.geometric == []
    whole = load_settings(None, [*stored, "train.augment.crop_scale=1"], environ={})
    assert whole.train.augment.geometric == []
    with pytest.raises(SettingsError, match="expected \\[min, max\\] with min <= max"):
        load_settings(None, ["train.augment.crop_scale=[0.8, 0.4]"], environ={})
    with pytest.raises(SettingsError, match="crop_scale.0: Input should be greater than 0"):
        load_settings(None, ["train.augment.crop_scale=0"], environ={})


def test_decoder_from_names_a_teacher(tmp_path: Path) -> None:
    message = conflict(tmp_path, TEACHER, "student.decoder_from=l")
    assert message.startswith("--set student.decoder_from=l and --set teachers=")
    assert message.endswith("student.decoder_from 'l' names no teacher; expected one of: h")


def test_decoder_from_online_needs_a_checkpoint(tmp_path: Path) -> None:
    online = ["student.decoder_from=h", "distillation.use_precomputed_features=false"]
    message = conflict(tmp_path, TEACHER, *online)
    assert "student.decoder_from 'h' with online teachers needs teachers.0.checkpoint" in message
    load_settings(None, [TEACHER, online[0]], environ={})  # a feature file stores the decoder


def test_training_without_any_loss(tmp_path: Path) -> None:
    message = conflict(tmp_path, "train.task_loss=false")
    assert "train.task_loss is false and teachers is empty" in message
    load_settings(None, ["train.task_loss=false", TEACHER], environ={})


@pytest.mark.parametrize("section", ["train", "extract"])
def test_fp16_needs_cuda(tmp_path: Path, section: str) -> None:
    message = conflict(tmp_path, f"{section}.precision=fp16", f"{section}.device=cpu")
    assert f"{section}.precision fp16 needs a CUDA device, but {section}.device is 'cpu'" in message
    load_settings(None, [f"{section}.precision=fp16", f"{section}.device=cuda:1"], environ={})


def test_compile_needs_the_fast_teacher(tmp_path: Path) -> None:
    message = conflict(tmp_path, "extract.compile=true", "extract.fast_teacher=off")
    assert "extract.compile compiles the fast teacher, but extract.fast_teacher is off" in message
    on_cpu = conflict(tmp_path, "extract.compile=true", "extract.device=cpu")
    assert "extract.fast_teacher auto is off on extract.device 'cpu'" in on_cpu
    load_settings(None, ["extract.compile=true", "extract.device=cuda"], environ={})


def test_annotation_file_needs_the_coco_layout(tmp_path: Path) -> None:
    message = conflict(tmp_path, "data.annotation_file=train.json", "data.layout=folder")
    assert "data.annotation_file 'train.json' is a COCO file, but data.layout is folder" in message


def test_frozen_until_parts_and_steps(tmp_path: Path) -> None:
    unknown = conflict(tmp_path, "train.frozen_until.mask_decodr=-1")
    assert "train.frozen_until.mask_decodr: Input should be 'image_encoder'" in unknown
    below = conflict(tmp_path, "train.frozen_until.mask_decoder=-2")
    assert "train.frozen_until.mask_decoder: Input should be greater than or equal to -1" in below


def test_conflict_names_the_file_and_the_option(tmp_path: Path) -> None:
    config = write(tmp_path / "run.yaml", "train:\n  batch_size: 6\n")
    with pytest.raises(SettingsError) as caught:
        load_settings(config, ["train.grad_accumulation=4"], environ={})
    assert str(caught.value).startswith(f"{config} and --set train.grad_accumulation=4: ")


def test_print_config_of_a_derived_mode_loads_back(tmp_path: Path) -> None:
    settings = load_settings(
        None,
        [TEACHER, f"data.val={tmp_path}", "distillation.dynamic_lambda.enabled=true"]
        + ["distillation.dynamic_lambda.metric=val/kd_loss"]
        + ["distillation.use_precomputed_features=false"],
        environ={},
    )
    dumped = write(tmp_path / "resolved.yaml", settings.to_yaml())
    loaded = load_settings(dumped, environ={})
    assert loaded == settings
    assert loaded.distillation.dynamic_lambda.resolved_mode == "min"


def test_yaml_round_trip(tmp_path: Path) -> None:
    checkpoint = write(tmp_path / "w.pt", "")
    settings = load_settings(
        None,
        [
            f"teachers=[{{name: h, model_type: vit_h, checkpoint: {checkpoint}}}]",
            "distillation.attention.enabled=true",
            f"data.train={tmp_path}",
            "extract.taps=[encoder.embed, encoder.qk.31]",
        ],
        environ={},
    )
    dumped = write(tmp_path / "resolved.yaml", settings.to_yaml())
    assert load_settings(dumped, environ={}) == settings


def test_set_dotted_creates_sections() -> None:
    values: dict = {}
    set_dotted(values, "a.b.c", 1)
    assert values == {"a": {"b": {"c": 1}}}


def test_settings_rejects_unknown_root_key() -> None:
    with pytest.raises(Exception, match="extra"):
        Settings(nonsense=1)  # type: ignore[call-arg]
