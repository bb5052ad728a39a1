"""Bad input through the `samkd` command: every case ends as one line on stderr naming the
file or key, a non-zero exit, no traceback, and no file left behind."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import h5py
import pytest
import torch
from typer.testing import CliRunner

from samkd.cli import app
from samkd.demo.shapes import write_shapes_dataset
from samkd.models import build_sam, save_state_dict

runner = CliRunner()
RUN_RECORDS = {"settings.yaml", "run.json", "metrics.jsonl"}
SETTINGS = """\
data: {{train: {data}, val: {data}, num_workers: 0}}
student: {{model_type: vit_t_mini}}
teachers: [{{name: t, model_type: vit_mini, checkpoint: {teacher}}}]
train: {{batch_size: 2, steps: 1, warmup_steps: 0, val_every: 1}}
logging: {{tensorboard: false, log_every: 1}}
"""


def invoke(*argv: str | Path) -> tuple[int, str]:
    result = runner.invoke(app, [str(arg) for arg in argv])
    return result.exit_code, result.stderr


def files_under(root: Path) -> set[Path]:
    return {path for path in root.rglob("*") if path.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dataset, teacher weights, its feature file and a finished run, in one folder."""
    root = tmp_path_factory.mktemp("world")
    data = write_shapes_dataset(root / "data", 4, (96, 128), seed=0)
    torch.manual_seed(1)
    save_state_dict(build_sam("vit_mini"), root / "teacher.pt")
    torch.manual_seed(2)
    save_state_dict(build_sam("vit_mini"), root / "other.pt")
    (root / "settings.yaml").write_text(SETTINGS.format(data=data, teacher=root / "teacher.pt"))
    config = root / "settings.yaml"
    assert invoke("extract", "-c", config, "-o", root / "features.h5")[0] == 0
    code, stderr = invoke(
        "train", "-c", config, "--features", root / "features.h5", "--output-dir", root / "run"
    )
    assert code == 0, stderr
    (root / "text.pt").write_text("not weights\n")
    return root


def copy_of_data(world: Path, name: str, change: Callable[[Path], None]) -> Path:
    folder = world / name
    if not folder.exists():
        shutil.copytree(world / "data", folder)
        change(folder)
    return folder


def empty_jpg(folder: Path) -> None:
    (folder / "image" / "zz_empty.jpg").write_bytes(b"")


def text_jpg(folder: Path) -> None:
    (folder / "image" / "zz_notes.jpg").write_text("notes, not pixels\n")


def changed_image(folder: Path) -> None:
    first = sorted((folder / "image").iterdir())[0]
    first.write_bytes(first.read_bytes() + b"\0")


def corrupted_row(world: Path) -> Path:
    path = world / "corrupted.h5"
    if not path.exists():
        shutil.copyfile(world / "features.h5", path)
        with h5py.File(path, "r+") as handle:
            embed = handle["teachers/t/taps/encoder.embed"]
            embed[1] = embed[1] * 2 + 1
    return path


# (case, argv from the world folder, what the one line must name)
CASES: list[tuple[str, Callable[[Path], list[str | Path]], str]] = [
    ("extract: text file as checkpoint",
     lambda w: ["extract", "-c", w / "settings.yaml", "--teacher", "vit_mini", "--checkpoint",
                w / "text.pt", "-o", w / "new.h5"], "text.pt"),
    ("train: text file as checkpoint",
     lambda w: ["train", "-c", w / "settings.yaml", "--features", w / "features.h5",
                "--set", f"student.checkpoint={w / 'text.pt'}", "--output-dir", w / "new"],
     "text.pt"),
    ("eval: text file as checkpoint",
     lambda w: ["eval", "-c", w / "settings.yaml", "--checkpoint", w / "text.pt"], "text.pt"),
    ("inspect: text file as checkpoint", lambda w: ["inspect", w / "text.pt"], "text.pt"),
    ("train: unknown device",
     lambda w: ["train", "-c", w / "settings.yaml", "--online", "--set", "train.device=tpu9",
                "--output-dir", w / "new"], "train.device"),
    ("train: infinite learning rate",
     lambda w: ["train", "-c", w / "settings.yaml", "--online", "--set", "train.lr=.inf",
                "--output-dir", w / "new"], "train.lr"),
    ("train: features of other teacher weights",
     lambda w: ["train", "-c", w / "settings.yaml", "--features", w / "features.h5",
                "--set", f"teachers.0.checkpoint={w / 'other.pt'}", "--output-dir", w / "new"],
     "other.pt"),
    ("train: features of another model type",
     lambda w: ["train", "-c", w / "settings.yaml", "--features", w / "features.h5",
                "--set", "teachers=[{name: t, model_type: vit_t_mini}]",
                "--output-dir", w / "new"], "vit_t_mini"),
    ("train: features of a changed image",
     lambda w: ["train", "-c", w / "settings.yaml", "--features", w / "features.h5",
                "--set", f"data.train={copy_of_data(w, 'changed', changed_image)}",
                "--output-dir", w / "new"], "shape_00000.png"),
    ("train: a corrupted feature row",
     lambda w: ["train", "-c", w / "settings.yaml", "--features", corrupted_row(w),
                "--set", "train.batch_size=4", "--output-dir", w / "new"], "shape_00001"),
    ("extract: zero-byte jpg",
     lambda w: ["extract", "-c", w / "settings.yaml", "--data",
                copy_of_data(w, "empty_jpg", empty_jpg), "-o", w / "new.h5"], "zz_empty.jpg"),
    ("extract: text file named jpg",
     lambda w: ["extract", "-c", w / "settings.yaml", "--data",
                copy_of_data(w, "text_jpg", text_jpg), "-o", w / "new.h5"], "zz_notes.jpg"),
    ("train --resume: text file as last.pt",
     lambda w: ["train", "--resume", w / "run_text_checkpoint"], "last.pt"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "argv", "named"), CASES, ids=[case[0] for case in CASES])
def test_bad_input_is_one_line_and_leaves_nothing(
    world: Path, case: str, argv: Callable[[Path], list[str | Path]], named: str
) -> None:
    resumable = world / "run_text_checkpoint"
    if not resumable.exists():
        shutil.copytree(world / "run", resumable)
        (resumable / "checkpoints" / "last.pt").write_text("not weights\n")
    arguments = argv(world)
    before = files_under(world)
    code, stderr = invoke(*arguments)
    assert code != 0
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, stderr
    assert named in errors[0]
    assert stderr.rstrip().endswith(errors[0])
    left = files_under(world) - before
    # What a failed run keeps, for `samkd inspect` (README, Reliability).
    assert {path.name for path in left} <= RUN_RECORDS
    assert all(path.parent == world / "new" for path in left)


def test_an_unexpected_error_is_one_line_with_a_hint(
    world: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr("samkd.inspect.run_inspect", broken)
    code, stderr = invoke("inspect", world / "run")
    assert code == 1
    assert stderr.strip() == (
        "error: ZeroDivisionError: division by zero (unexpected; run with "
        "--set logging.level=DEBUG for the traceback)"
    )
    code, stderr = invoke("inspect", world / "run", "--set", "logging.level=DEBUG")
    assert code == 1
    assert "Traceback" in stderr
    assert stderr.rstrip().splitlines()[-1].startswith("error: ZeroDivisionError")


def test_read_only_outputs_fail_before_the_work(world: Path, tmpfs) -> None:
    read_only = tmpfs("disk", "64k", read_only=True)
    config = world / "settings.yaml"
    checkpoint = world / "run" / "student.pt"
    cases = [
        (["extract", "-c", config, "-o", read_only / "f.h5"], f"{read_only}"),
        (["train", "-c", config, "--online", "--output-dir", read_only / "run"],
         "train.output_dir"),
        (["eval", "-c", config, "--checkpoint", checkpoint, "--json", read_only / "x.json"],
         "--json"),
        (["eval", "-c", config, "--checkpoint", checkpoint, "--overlays", read_only / "png"],
         "--overlays"),
    ]  # fmt: skip
    for argv, named in cases:
        code, stderr = invoke(*argv)
        assert code != 0, argv
        assert "Traceback" not in stderr
        last = stderr.rstrip().splitlines()[-1]
        assert last.startswith("error: ") and named in last and "writ" in last, stderr


def test_inspect_of_a_read_only_run_prints_its_summary(world: Path, tmpfs) -> None:
    folder = tmpfs("disk", "4m")
    shutil.copytree(world / "run", folder / "run", ignore=shutil.ignore_patterns("*.pt", "*.png"))
    subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
    result = runner.invoke(app, ["inspect", str(folder / "run")])
    assert result.exit_code == 1
    assert "loss/total" in result.stdout
    assert result.stderr.strip() == (
        f"error: {folder / 'run' / 'loss_curves.png'}: not written: Read-only file system"
    )
