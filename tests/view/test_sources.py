"""What `samkd view SOURCE ... --teacher` names, and its one-line errors."""

import shutil
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from samkd.cli import app
from samkd.errors import UsageError
from samkd.settings import Settings, load_settings
from samkd.view import require_view_extra
from samkd.view.sources import model_sources, source_spec

from .conftest import IMAGE_SIZE, STUDENT, TEACHER, require

runner = CliRunner()


def settings(*assignments: str) -> Settings:
    return load_settings(None, list(assignments), environ={})


def test_a_run_folder_gives_its_weights_type_and_size(student_run: Path) -> None:
    spec = source_spec(student_run, settings()).spec
    assert spec is not None
    assert (spec.model_type, spec.image_size) == (STUDENT, IMAGE_SIZE)
    assert spec.checkpoint == student_run / "student.pt"


def test_a_run_still_training_gives_its_latest_checkpoint(
    tmp_path: Path, student_run: Path
) -> None:
    run = tmp_path / "running"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(student_run / "settings.yaml", run)
    shutil.copy(student_run / "student.pt", run / "checkpoints" / "last.pt")
    spec = source_spec(run, settings()).spec
    assert spec is not None and spec.checkpoint == run / "checkpoints" / "last.pt"
    (run / "checkpoints" / "last.pt").unlink()
    with pytest.raises(UsageError, match="no student.pt or training checkpoint yet"):
        source_spec(run, settings())


def test_a_checkpoint_takes_model_type_and_image_size(teacher_run: Path) -> None:
    given = settings(f"student.model_type={TEACHER}", "data.image_size=128")
    spec = source_spec(teacher_run / "student.pt", given).spec
    assert spec is not None and (spec.model_type, spec.image_size) == (TEACHER, 128)


def test_the_teacher_named_in_a_run_folder(student_run: Path, teacher_run: Path) -> None:
    student, teacher = model_sources([student_run], "t", None, settings())
    assert teacher.spec is not None
    assert (teacher.label, teacher.spec.model_type) == ("teacher t", TEACHER)
    assert teacher.spec.checkpoint == teacher_run / "student.pt"
    assert teacher.spec.image_size == IMAGE_SIZE


def test_a_teacher_model_type_with_weights(teacher_run: Path) -> None:
    (only,) = model_sources([], TEACHER, teacher_run / "student.pt", settings())
    assert only.spec is not None and only.spec.image_size == 256  # the type's own size
    (sized,) = model_sources([], TEACHER, None, settings("data.image_size=64"))
    assert sized.spec is not None and sized.spec.image_size == 64


def test_same_names_are_numbered(student_run: Path) -> None:
    labels = [spec.label for spec in model_sources([student_run] * 2, None, None, settings())]
    assert labels == ["1: student", "2: student"]


@pytest.mark.parametrize(
    ("sources", "teacher", "checkpoint", "message"),
    [
        (["student", "student"], TEACHER, None, "^samkd view compares at most 2 models, got 3"),
        ([], None, "x.pt", "^--teacher-checkpoint needs --teacher"),
        ([], "vit_x", None, "^--teacher vit_x: no teacher of that name .* not a model type"),
        (["nowhere"], None, None, "nowhere: not a training run folder, checkpoint or samkd"),
    ],
)
def test_bad_sources_are_one_line(
    student_run: Path,
    sources: list[str],
    teacher: str | None,
    checkpoint: str | None,
    message: str,
) -> None:
    paths = [student_run if name == "student" else Path(name) for name in sources]
    with pytest.raises(UsageError, match=message):
        model_sources(paths, teacher, None if checkpoint is None else Path(checkpoint), settings())


def test_missing_gradio_is_a_one_line_error_naming_the_extra(
    monkeypatch: pytest.MonkeyPatch, student_run: Path
) -> None:
    monkeypatch.setitem(sys.modules, "gradio", None)
    with pytest.raises(UsageError):
        require_view_extra()
    result = runner.invoke(app, ["view", str(student_run)])
    assert result.exit_code == 1
    assert result.stderr.strip() == (
        "error: gradio is not installed; samkd view needs the view extra: pip install 'samkd[view]'"
    )


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["nowhere"], "nowhere: not a training run folder, checkpoint or samkd export folder"),
        ([], "error: nothing to look at: pass a run folder, checkpoint or export folder, "),
        # The models run on eval.device: one that is not there stops the command.
        (["STUDENT", "--set", "eval.device=cuda:99"], "error: device 'cuda:99' was asked for"),
    ],
)
def test_cli_errors_before_serving(student_run: Path, arguments: list[str], message: str) -> None:
    require("gradio")
    given = [str(student_run) if argument == "STUDENT" else argument for argument in arguments]
    result = runner.invoke(app, ["view", *given])
    assert result.exit_code == 1
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
