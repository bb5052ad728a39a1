"""The `samkd` command: help, version, settings resolution and one-line errors."""

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from samkd import __version__
from samkd.cli import app

runner = CliRunner()
SUBCOMMANDS = ["extract", "train", "eval", "inspect", "export"]


def test_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"samkd {__version__}"


def test_help_lists_subcommands() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for name in SUBCOMMANDS:
        assert name in result.output


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_subcommand_help(name: str) -> None:
    result = runner.invoke(app, [name, "--help"])
    assert result.exit_code == 0
    assert "--config" in result.output
    assert "--print-config" in result.output


def test_extract_help_names_taps() -> None:
    result = runner.invoke(app, ["extract", "--help"])
    assert "encoder.qk.<i>" in result.output


@pytest.mark.parametrize("name", ["extract", "train", "eval", "export"])
def test_print_config_round_trips(name: str, tmp_path: Path) -> None:
    result = runner.invoke(app, [name, "--print-config", "--set", "train.lr=0.125"])
    assert result.exit_code == 0, result.output
    printed = yaml.safe_load(result.stdout)
    assert printed["train"]["lr"] == 0.125
    again = tmp_path / "again.yaml"
    again.write_text(result.stdout)
    second = runner.invoke(app, [name, "--print-config", "--config", str(again)])
    assert second.stdout == result.stdout


def test_flags_beat_set_options() -> None:
    result = runner.invoke(
        app, ["train", "--print-config", "--set", "train.steps=5", "--steps", "9", "--online"]
    )
    printed = yaml.safe_load(result.stdout)
    assert printed["train"]["steps"] == 9
    assert printed["distillation"]["use_precomputed_features"] is False


def test_extract_teacher_flags() -> None:
    result = runner.invoke(app, ["extract", "--print-config", "--teacher", "vit_h"])
    printed = yaml.safe_load(result.stdout)
    (teacher,) = printed["teachers"]
    assert teacher["name"] == teacher["model_type"] == "vit_h"
    assert (teacher["checkpoint"], teacher["weight"]) == (None, 1.0)


def test_environment_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAMKD_TRAIN__STEPS", "33")
    result = runner.invoke(app, ["train", "--print-config"])
    assert yaml.safe_load(result.stdout)["train"]["steps"] == 33


def test_typo_in_config_file_is_one_line(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("distillation:\n  encodr:\n    enabled: true\n")
    result = runner.invoke(app, ["train", "--config", str(config)])
    assert result.exit_code == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [f"error: {config}: unknown key 'distillation.encodr'; did you mean 'encoder'?"]
