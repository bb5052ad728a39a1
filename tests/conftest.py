"""Fixtures shared across the test packages."""

import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from loguru import logger
from rich.console import Console
from segment_anything.modeling import Sam

import samkd.features.images
from samkd.demo.shapes import write_shapes_dataset
from samkd.models import build_sam, save_state_dict
from samkd.settings import load_settings
from samkd.train import run_train


@pytest.fixture
def hashed(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The image files that extraction or a training check hashes (sha256), in call order."""
    calls: list[Path] = []
    real = samkd.features.images.file_sha256

    def counting(path: Path, *args: object) -> str:
        calls.append(path)
        return real(path)

    monkeypatch.setattr(samkd.features.images, "file_sha256", counting)
    return calls


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """`tmpfs(name, size, read_only=False)`: a new tmpfs of `size` ("8m") at tmp_path/name,
    unmounted at the end; skips the test where mounting is not permitted (not root)."""
    mounted: list[Path] = []

    def mount(name: str, size: str, read_only: bool = False) -> Path:
        if shutil.which("mount") is None:
            pytest.skip("cannot mount a tmpfs here: no mount command")
        folder = tmp_path / name
        folder.mkdir()
        options = f"size={size}" + (",ro" if read_only else "")
        completed = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
            capture_output=True,
            text=True,
        )
        if completed.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {completed.stderr.strip()}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in reversed(mounted):
        subprocess.run(["umount", "-l", str(folder)], check=False)


def push_masks_below_zero(model: Sam) -> Sam:
    """`model` with mask logits near -128 for every prompt (an undertrained model, or one
    given inputs at the wrong scale, predicts empty masks like this): the decoder's last
    upscaling layer outputs a constant 4 and each output token's hypernetwork a constant -1
    per channel."""
    decoder = model.mask_decoder
    upscale = decoder.output_upscaling[3]
    with torch.no_grad():
        upscale.weight.zero_()
        upscale.bias.fill_(4.0)
        for hypernetwork in decoder.output_hypernetworks_mlps:
            hypernetwork.layers[-1].weight.zero_()
            hypernetwork.layers[-1].bias.fill_(-1.0)
    return model


@dataclass(frozen=True)
class EmptyMaskRun:
    """A finished `samkd train` run (`vit_t_mini` at 128 px, one step, validation) of a
    student that predicts empty masks, and the warnings it logged."""

    folder: Path
    data: Path
    warnings: list[str]


@pytest.fixture(scope="session")
def empty_mask_run(tmp_path_factory: pytest.TempPathFactory) -> EmptyMaskRun:
    root = tmp_path_factory.mktemp("empty-masks")
    data = write_shapes_dataset(root / "shapes", 2, (96, 128), seed=3)
    torch.manual_seed(0)
    save_state_dict(push_masks_below_zero(build_sam("vit_t_mini", image_size=128)), root / "w.pt")
    settings = load_settings(
        None,
        [
            "student.model_type=vit_t_mini", f"student.checkpoint={root / 'w.pt'}",
            "data.image_size=128", f"data.train={data}", f"data.val={data}", "teachers=[]",
            "train.steps=1", "train.batch_size=2", "train.lr=1e-12", "train.warmup_steps=0",
            "data.num_workers=0", "logging.tensorboard=false", f"train.output_dir={root / 'run'}",
        ],
        environ={},
    )  # fmt: skip
    warnings: list[str] = []
    handler = logger.add(lambda line: warnings.append(line.record["message"]), level="WARNING")
    try:
        run_train(settings, console=Console(quiet=True))
    finally:
        logger.remove(handler)
    return EmptyMaskRun(root / "run", data, warnings)
