"""Settings: precedence, one-line errors, and YAML round trips."""

from pathlib import Path

import pytest

from samkd.settings import Settings, SettingsError, load_settings, set_dotted


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
    with pytest.raises(SettingsError, match="'a' is repeated"):
        load_settings(environ=env)


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
