"""`samkd extract` end to end: taps, reruns, SIGKILL and resume, torchrun shards and the join,
image hashing and the training check of image files."""

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

import samkd.extract
import samkd.features.images
import samkd.features.join
from samkd.cli import app
from samkd.data import SegmentationDataset
from samkd.demo.shapes import write_shapes_dataset
from samkd.extract import (
    load_extraction_dataset,
    probe_tap_shapes,
    run_extract,
    teacher_batch_features,
)
from samkd.features import FeatureStore, FeatureStoreError
from samkd.models import CheckpointError, build_sam, save_state_dict
from samkd.runtime import input_image_size
from samkd.settings import load_settings

from .nodes import torchrun_nodes

TAPS = ["encoder.embed", "encoder.qk.3", "encoder.block.1"]
# Bitwise comparisons between processes need one thread: a loaded machine must not change
# how CPU kernels split their reductions.
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}
TORCHRUN_SCRIPT = Path(__file__).parent / "features" / "torchrun_extract.py"
QUIET = Console(quiet=True)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_shapes_dataset(tmp_path_factory.mktemp("data") / "shapes", 12, (96, 128))


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(3)
    path = tmp_path_factory.mktemp("weights") / "teacher.pt"
    save_state_dict(build_sam("vit_mini"), path)
    return path


def write_config(path: Path, shapes: Path, teacher: Path, output: Path) -> Path:
    settings = load_settings(
        None,
        [
            f"data.train={shapes}",
            "data.num_workers=0",
            "student.model_type=vit_t_mini",
            f"teachers=[{{name: t, model_type: vit_mini, checkpoint: {teacher}}}]",
            f"extract.output={output}",
            f"extract.taps={TAPS}",
            "extract.shard_size=2",
            "extract.batch_size=2",
        ],
        environ={},
    )
    path.write_text(settings.to_yaml())
    return path


def datasets(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as handle:
        return {tap: handle[f"teachers/t/taps/{tap}"][()] for tap in TAPS}


def assert_identical(left: Path, right: Path) -> None:
    first, second = datasets(left), datasets(right)
    for tap in TAPS:
        assert np.array_equal(first[tap], second[tap]), tap


def dataset_of(root: Path) -> SegmentationDataset:
    overrides = [f"data.train={root}", "student.model_type=vit_t_mini"]
    settings = load_settings(None, overrides, environ={})
    return load_extraction_dataset(settings, input_image_size(settings))


@pytest.fixture
def one_thread() -> Iterator[None]:
    """In-process extraction bitwise like the one-thread reference."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def no_teacher(*args: object, **kwargs: object) -> None:
    raise AssertionError("no teacher should run")


def extract(config: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "samkd", "extract", "--config", str(config), *extra]
    return subprocess.run(command, capture_output=True, text=True, env=ONE_THREAD)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, shapes: Path, teacher: Path) -> Path:
    folder = tmp_path_factory.mktemp("reference")
    config = write_config(folder / "c.yaml", shapes, teacher, folder / "features.h5")
    completed = extract(config)
    assert completed.returncode == 0, completed.stderr[-2000:]
    return folder / "features.h5"


def test_every_tap_is_stored_with_its_shape(reference: Path) -> None:
    stored = datasets(reference)
    assert stored["encoder.embed"].shape == (12, 256, 16, 16)
    assert stored["encoder.qk.3"].shape == (12, 256, 256)
    assert stored["encoder.block.1"].shape == (12, 192, 16, 16)
    rows = stored["encoder.qk.3"].astype(np.float64).sum(axis=-1)
    assert np.allclose(rows, 1.0, atol=2e-2)  # coarse attention rows stay distributions


@pytest.mark.parametrize(
    ("model_type", "taps"),
    [
        ("vit_mini", ["encoder.embed", "encoder.qk.1", "encoder.block.0"]),
        ("vit_t_mini", ["encoder.embed", "encoder.qk.0", "encoder.block.2"]),
    ],
)
def test_meta_probe_gives_the_shapes_a_real_forward_gives(model_type: str, taps: list[str]) -> None:
    planned = probe_tap_shapes(model_type, taps, image_size=128, grid_size=8)
    model = build_sam(model_type, image_size=128)
    computed = teacher_batch_features(model, torch.randn(2, 3, 128, 128), taps, grid_size=8)
    assert planned == {tap: tuple(value.shape[1:]) for tap, value in computed.items()}


def test_rerun_does_nothing_and_says_so(
    tmp_path: Path, shapes: Path, teacher: Path, reference: Path
) -> None:
    config = write_config(tmp_path / "c.yaml", shapes, teacher, reference)
    before = reference.stat().st_mtime_ns
    completed = extract(config)
    assert completed.returncode == 0
    assert "already complete, nothing to do" in completed.stderr + completed.stdout
    assert reference.stat().st_mtime_ns == before


def test_changed_settings_are_refused(
    tmp_path: Path, shapes: Path, teacher: Path, reference: Path
) -> None:
    config = write_config(tmp_path / "c.yaml", shapes, teacher, reference)
    completed = extract(config, "--set", "extract.dtype=float32")
    assert completed.returncode == 1
    assert "Traceback" not in completed.stderr
    assert completed.stderr.strip().splitlines()[-1] == (
        "error: features.h5: was extracted with dtype float16, now float32 (use another output, "
        "or delete it to start over)"
    )


@pytest.mark.parametrize(
    ("option", "expected"),
    [
        ("extract.fast_teacher=on", "was extracted with attention reference, now fused"),
        ("extract.precision=bf16", "was extracted with precision fp32, now bf16"),
    ],
)
def test_a_changed_way_of_computing_is_refused(
    tmp_path: Path, shapes: Path, teacher: Path, reference: Path, option: str, expected: str
) -> None:
    config = write_config(tmp_path / "c.yaml", shapes, teacher, reference)
    completed = extract(config, "--set", option)
    assert completed.returncode == 1
    setting = option.split("=")[0]
    assert completed.stderr.strip().splitlines()[-1] == (
        f"error: features.h5: {expected}; set {setting} to match (use another output, or "
        "delete it to start over)"
    )


def test_sigkill_then_rerun_gives_identical_file(
    tmp_path: Path, shapes: Path, teacher: Path, reference: Path
) -> None:
    output = tmp_path / "features.h5"
    config = write_config(tmp_path / "c.yaml", shapes, teacher, output)
    command = [sys.executable, "-m", "samkd", "extract", "--config", str(config)]
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ONE_THREAD
    )
    parts = tmp_path / "features.h5.parts" / "t"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if parts.is_dir() and len(list(parts.glob("part-*.h5"))) >= 2:
            break
        time.sleep(0.02)
    assert process.poll() is None, "extraction finished before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not output.exists()
    completed = extract(config)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert "resuming" in completed.stderr + completed.stdout
    assert_identical(output, reference)


def test_torchrun_join_outlasts_a_short_collective_timeout(
    tmp_path: Path, shapes: Path, teacher: Path, reference: Path
) -> None:
    """Collectives time out after 4 s and the join takes 10 s longer than it does: a rank
    waiting in a collective while rank 0 joins (as in a barrier) fails the job."""
    output = tmp_path / "features.h5"
    config = write_config(tmp_path / "c.yaml", shapes, teacher, output)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        str(TORCHRUN_SCRIPT), "4", "10", "extract", "--config", str(config),
    ]  # fmt: skip
    completed = subprocess.run(command, capture_output=True, text=True, env=ONE_THREAD)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "reading rank 0's image index" in completed.stderr  # rank 1 hashed nothing
    assert_identical(output, reference)
    assert not (tmp_path / "features.h5.parts").exists()
    assert sorted(item.name for item in tmp_path.iterdir()) == ["c.yaml", "features.h5"]


def test_two_nodes_extract_a_file_equal_to_one_process(
    tmp_path: Path, shapes: Path, teacher: Path, reference: Path
) -> None:
    """`torchrun --nnodes 2 --nproc_per_node 1`: the global rank (the node's) picks the
    shards and rank 0 alone holds the lock and joins; the file is one process's, bitwise."""
    output = tmp_path / "features.h5"
    config = write_config(tmp_path / "c.yaml", shapes, teacher, output)
    nodes = torchrun_nodes(["-m", "samkd", "extract", "--config", str(config)], port=29561)
    for node in nodes:
        assert node.returncode == 0, node.stderr[-3000:]
    assert "reading rank 0's image index" in nodes[1].stderr  # node 1 is rank 1
    assert "joining the shards" in nodes[0].stderr and "joining" not in nodes[1].stderr
    assert_identical(output, reference)
    assert sorted(item.name for item in tmp_path.iterdir()) == ["c.yaml", "features.h5"]


def test_a_rerun_of_a_finished_extraction_hashes_no_image(
    tmp_path: Path, shapes: Path, teacher: Path, reference: Path, hashed: list[Path]
) -> None:
    settings = load_settings(
        write_config(tmp_path / "c.yaml", shapes, teacher, reference), environ={}
    )
    assert run_extract(settings, console=QUIET) == reference
    assert hashed == []  # the output's index records each file's size and mtime


def test_a_killed_join_is_redone_by_the_rerun_without_computing(
    tmp_path: Path,
    shapes: Path,
    teacher: Path,
    reference: Path,
    hashed: list[Path],
    one_thread: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    output = tmp_path / "features.h5"
    settings = load_settings(write_config(tmp_path / "c.yaml", shapes, teacher, output), environ={})

    def killed(*args: object) -> None:
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(samkd.features.join, "_join_teacher", killed)
        with pytest.raises(KeyboardInterrupt):
            run_extract(settings, console=QUIET)
    assert len(hashed) == 12 and not output.exists()
    stale = tmp_path / f".features.h5.{os.getpid()}-0123abcd.tmp"  # what a SIGKILL leaves
    stale.write_bytes(b"\x89HDF\r\n" + b"x" * 999)
    hashed.clear()
    monkeypatch.setattr(samkd.extract, "build_teacher", no_teacher)
    assert run_extract(settings, console=QUIET) == output
    assert hashed == []  # the parts folder's index is the cache
    assert not stale.exists()
    assert_identical(output, reference)


def test_training_check_names_a_changed_image(
    tmp_path: Path, shapes: Path, reference: Path, hashed: list[Path]
) -> None:
    copy = tmp_path / "shapes"
    shutil.copytree(shapes, copy)  # copy2: the same mtimes
    store = FeatureStore(reference)
    records = dataset_of(copy).records
    files = [record.image_path for record in records]
    store.check_matches(image_ids=[record.image_id for record in records], image_files=files)
    assert hashed == []
    edited = files[5]
    data = bytearray(edited.read_bytes())
    data[-5] ^= 0xFF  # same size, new mtime
    edited.write_bytes(bytes(data))
    with pytest.raises(FeatureStoreError) as error:
        store.check_matches(image_files=files)
    assert str(error.value).startswith(
        f"features.h5: image '{records[5].image_id}' ({edited}) has changed since extraction "
        "(sha256 "
    )
    assert hashed == [edited]


def test_tap_errors_are_one_line(shapes: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    common = ["extract", "--teacher", "vit_mini", "--data", str(shapes)]
    common += ["--output", str(tmp_path / "x.h5"), "--set", "student.model_type=vit_t_mini"]
    result = runner.invoke(app, [*common, "--tap", "encoder.qk.99"])
    assert result.exit_code == 1
    assert "unknown tap 'encoder.qk.99'; valid taps: encoder.block.0" in result.stderr
    result = runner.invoke(app, [*common, "--tap", "decoder.upscaled"])
    assert result.exit_code == 1
    assert "depends on prompts" in result.stderr
    assert not (tmp_path / "x.h5").exists()


def test_run_extract_without_teachers_is_an_error(shapes: Path) -> None:
    settings = load_settings(None, [f"data.train={shapes}"], environ={})
    with pytest.raises(ValueError, match="no teacher to extract"):
        run_extract(settings)


def test_a_checkpoint_that_cannot_load_fails_before_hashing(
    tmp_path: Path, shapes: Path, hashed: list[Path]
) -> None:
    student_weights = tmp_path / "student.pt"
    save_state_dict(build_sam("vit_t_mini"), student_weights)
    config = write_config(tmp_path / "c.yaml", shapes, student_weights, tmp_path / "f.h5")
    with pytest.raises(CheckpointError, match="does not fit model type 'vit_mini'"):
        run_extract(load_settings(config, environ={}), console=QUIET)
    assert hashed == []
    assert sorted(item.name for item in tmp_path.iterdir()) == ["c.yaml", "student.pt"]
