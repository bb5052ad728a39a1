"""The README's SAM 2.1 commands, run as a new user would, on the small presets: `hiera_mini`
for `sam2.1_hiera_l` (its checkpoint in the official layout), `vit_t_mini` students, 64 px."""

import json
import re
import shlex
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

pytest.importorskip("sam2")

from samkd.cli import app  # noqa: E402
from samkd.demo.shapes import write_shapes_dataset  # noqa: E402
from samkd.models import build_sam, save_state_dict  # noqa: E402

README = Path(__file__).resolve().parent.parent / "README.md"
# The model type (not the checkpoint's name, sam2.1_hiera_large.pt) becomes the preset.
PRESET = {r"sam2\.1_hiera_l\b": "hiera_mini", r"--steps 20000": "--steps 2"}
SMALL = [
    "data.image_size=64",
    "data.num_workers=0",
    "student.model_type=vit_t_mini",
    "train.batch_size=2",
    "train.warmup_steps=0",
    "logging.tensorboard=false",
    "eval.speed=false",
]


def readme_commands() -> list[list[str]]:
    """The `samkd` commands of the README's SAM 2.1 block, comments dropped."""
    section = README.read_text().split("### SAM 2.1 as the teacher", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    joined = re.sub(r"\\\n\s*", "", block)
    lines = [line.split("#", 1)[0].strip() for line in joined.splitlines()]
    return [shlex.split(line) for line in lines if line.startswith("samkd ")]


def write_user_files(root: Path) -> None:
    """data/train (two images without masks), data/val and the two checkpoints."""
    train = write_shapes_dataset(root / "data" / "train", 6, (96, 128), seed=0)
    for stem in sorted(path.name for path in (train / "mask").iterdir())[:2]:
        shutil.rmtree(train / "mask" / stem)
    write_shapes_dataset(root / "data" / "val", 2, (96, 128), seed=1)
    torch.manual_seed(0)
    torch.save({"model": build_sam("hiera_mini").state_dict()}, root / "sam2.1_hiera_large.pt")
    save_state_dict(build_sam("vit_t_mini"), root / "mobile_sam.pt")


def test_readme_sam2_commands_run_on_the_presets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    commands = readme_commands()
    assert [command[1] for command in commands] == [
        "extract", "extract", "inspect", "train", "eval", "eval"
    ]  # fmt: skip
    monkeypatch.chdir(tmp_path)
    write_user_files(tmp_path)
    for command in commands:
        line = shlex.join(command[1:])
        for pattern, preset in PRESET.items():
            line = re.sub(pattern, preset, line)
        arguments = shlex.split(line)
        if arguments[0] != "inspect":
            arguments += [f"--set={value}" for value in SMALL]
        if arguments[0] == "eval":
            arguments += ["--json", "eval.json"]
        result = CliRunner().invoke(app, arguments)
        assert result.exit_code == 0, f"{line}: {result.output}"
        if arguments[0] == "inspect":
            assert "hiera_mini, square frame" in result.output
            assert "encoder.high_res.0" in result.output
        if arguments[0] == "eval":
            report = json.loads(Path("eval.json").read_text())
            assert report["quality"]["box"]["single"]["count"] > 0
    # The first eval compared the student with the stored SAM 2 teacher; the last scored it.
    assert report["model"]["model_type"] == "hiera_mini" and report["model"]["frame"] == "square"
    assert Path("runs/sam21/student.pt").is_file()
