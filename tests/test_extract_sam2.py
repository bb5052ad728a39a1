"""`samkd extract` of a SAM 2 teacher (`hiera_mini`): its frame and high-resolution maps in the
file, its automatic masks, SIGKILL and resume, and one-line errors."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

pytest.importorskip("sam2")

from samkd.cli import app  # noqa: E402
from samkd.demo.shapes import write_shapes_dataset  # noqa: E402
from samkd.extract import run_extract  # noqa: E402
from samkd.features import (  # noqa: E402
    FeatureStore,
    FeatureStoreError,
    inspect_feature_file,
    read_decoder_state_dict,
)
from samkd.features.pseudo_masks import generate_pseudo_masks  # noqa: E402
from samkd.models import build_sam, save_state_dict  # noqa: E402
from samkd.models.sam2_decoding import Sam2Features  # noqa: E402
from samkd.models.teacher import prompt_decoder_for  # noqa: E402
from samkd.settings import load_settings  # noqa: E402

TAPS = ("encoder.embed", "encoder.high_res.0", "encoder.high_res.1")
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}
QUIET = Console(quiet=True)
MASK_OPTIONS = [
    "extract.pseudo_masks.pred_iou_thresh=0",
    "extract.pseudo_masks.stability_score_thresh=0",
    "extract.pseudo_masks.points_per_side=2",
    "extract.pseudo_masks.max_masks=3",
]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_shapes_dataset(tmp_path_factory.mktemp("data") / "shapes", 8, (96, 128))


def write_config(path: Path, shapes: Path, output: Path, *extra: str) -> Path:
    settings = load_settings(
        None,
        [
            f"data.train={shapes}",
            "data.num_workers=0",
            "data.image_size=64",
            "student.model_type=vit_t_mini",
            "teachers=[{name: h, model_type: hiera_mini}]",
            f"extract.output={output}",
            "extract.high_res=true",
            "extract.shard_size=2",
            "extract.batch_size=2",
            "extract.pseudo_masks.enabled=true",
            *MASK_OPTIONS,
            *extra,
        ],
        environ={},
    )
    path.write_text(settings.to_yaml())
    return path


def extract(config: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "samkd", "extract", "--config", str(config)]
    return subprocess.run(command, capture_output=True, text=True, env=ONE_THREAD)


def contents(path: Path) -> dict[str, bytes]:
    with h5py.File(path, "r") as handle:
        group = handle["teachers/h"]
        found = {tap: group["taps"][tap][()].tobytes() for tap in TAPS}
        found["pseudo_masks"] = "\0".join(group["pseudo_masks"].asstr()[()]).encode()
    return found


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, shapes: Path) -> Path:
    folder = tmp_path_factory.mktemp("reference")
    completed = extract(write_config(folder / "c.yaml", shapes, folder / "features.h5"))
    assert completed.returncode == 0, completed.stderr[-2000:]
    return folder / "features.h5"


def test_frame_high_res_taps_and_their_bytes(reference: Path) -> None:
    store = FeatureStore(reference)
    (teacher,) = store.teachers
    assert teacher.frame == "square" and teacher.model_type == "hiera_mini"
    assert [(tap.name, tap.shape) for tap in teacher.taps] == [
        ("encoder.embed", (256, 4, 4)),
        ("encoder.high_res.0", (32, 16, 16)),
        ("encoder.high_res.1", (64, 8, 8)),
    ]
    with h5py.File(reference, "r") as handle:
        assert handle["teachers/h"].attrs["frame"] == "square"
        assert "sam_mask_decoder.conv_s0.weight" in handle["teachers/h/decoder"]
    report = inspect_feature_file(reference)
    per_image = {tap.name: tap.bytes_per_image for tap in report.teachers[0].taps}
    # float16, 256 x 4 x 4 = 8 KiB; the two maps are 2x and 1x that (3x), at every size.
    assert per_image["encoder.embed"] == 8192
    assert per_image["encoder.high_res.0"] == 2 * 8192 and per_image["encoder.high_res.1"] == 8192


def test_stored_masks_are_what_the_stored_decoder_gives(reference: Path) -> None:
    """The SAM 2 generator on the features as stored (float16) gives the stored masks."""
    store = FeatureStore(reference)
    decoder = prompt_decoder_for("hiera_mini", 64)
    decoder.load_state_dict(read_decoder_state_dict(reference, "h"), strict=True)
    options = load_settings(None, MASK_OPTIONS, environ={}).extract.pseudo_masks
    for index in (0, 5):
        taps = store[index]["h"]
        features = Sam2Features(
            taps["encoder.embed"][None], (taps[TAPS[1]][None], taps[TAPS[2]][None])
        )
        size = tuple(int(side) for side in store.image_sizes[index])
        masks = generate_pseudo_masks(decoder.eval(), features, size, options)  # type: ignore[arg-type]
        assert masks == store.pseudo_masks(index)
        assert masks


def test_sigkill_then_rerun_gives_identical_file(
    tmp_path: Path, shapes: Path, reference: Path
) -> None:
    output = tmp_path / "features.h5"
    config = write_config(tmp_path / "c.yaml", shapes, output)
    command = [sys.executable, "-m", "samkd", "extract", "--config", str(config)]
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ONE_THREAD
    )
    parts = tmp_path / "features.h5.parts" / "h"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if parts.is_dir() and list(parts.glob("part-*.h5")):
            break
        time.sleep(0.01)
    assert process.poll() is None, "extraction finished before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not output.exists()
    completed = extract(config)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert "resuming" in completed.stderr + completed.stdout
    assert contents(output) == contents(reference)


def test_another_frame_is_refused(tmp_path: Path, shapes: Path, reference: Path) -> None:
    output = tmp_path / reference.name
    shutil.copy(reference, output)
    frame = "teachers=[{name: h, model_type: hiera_mini, frame: longest_side}]"
    settings = load_settings(write_config(tmp_path / "c.yaml", shapes, output, frame), environ={})
    with pytest.raises(FeatureStoreError) as error:
        run_extract(settings, QUIET)
    assert "teacher 'h' was extracted in frame square, now longest_side" in str(error.value)


def test_a_sam1_checkpoint_for_a_sam2_teacher_is_one_line(tmp_path: Path, shapes: Path) -> None:
    torch.manual_seed(0)
    checkpoint = tmp_path / "sam_vit_h_4b8939.pth"
    save_state_dict(build_sam("vit_mini"), checkpoint)
    arguments = [
        "extract",
        "--teacher",
        "sam2.1_hiera_l",
        "--checkpoint",
        str(checkpoint),
        "--data",
        str(shapes),
        "--output",
        str(tmp_path / "f.h5"),
    ]
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: checkpoint ")
    assert "SAM 1 (ViT) weights" in lines[0] and "'sam2.1_hiera_l' is SAM 2.1" in lines[0]
    assert not (tmp_path / "f.h5").exists() and not np.any(list(tmp_path.glob("f.h5*")))
