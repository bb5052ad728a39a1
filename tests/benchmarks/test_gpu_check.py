"""The GPU check's dry run: the whole script on the CPU with tiny presets, its requirements
installed from the wheels that travel to the GPU machine, as they are installed there."""

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from benchmarks import gpu_wheels
from benchmarks.gpu_wheels import CARRIED, WheelError, check

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_dry_run_writes_every_result(tmp_path: Path) -> None:
    if not any(gpu_wheels.WHEELS.glob("*.whl")):
        pytest.skip("no wheels in gpu-wheels/: run bash benchmarks/gpu_wheels.sh")
    # The script runs under this interpreter, as it would under the GPU machine's python3.
    environment = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "VIRTUAL_ENV": sys.prefix,
    }
    environment.pop("OUT", None)
    command = ["bash", "benchmarks/gpu_check.sh", "--dry-run", "--output", str(tmp_path)]
    completed = subprocess.run(
        command, cwd=REPO_ROOT, capture_output=True, text=True, env=environment
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "every requirement met" in completed.stdout
    assert "imported from there: " in completed.stdout
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    assert results["dry_run"] is True
    assert set(results["teacher_encoder"]) >= {"fp32", "bf16", "bf16_over_fp32"}
    assert results["extraction"]["images"] == 4
    assert results["extraction"]["steady_images_per_s"] > 0
    assert set(results["train"]) >= {"plain", "precomputed", "online", "precomputed_over_plain"}
    for mode in ("plain", "precomputed", "online"):
        assert results["train"][mode]["images_per_s"] > 0
    markdown = (tmp_path / "gpu_check.md").read_text()
    assert markdown.startswith("<!-- benchmark:gpu_check -->")
    assert "train step online" in markdown


def fake_wheel(folder: Path, name: str, version: str, requires: tuple[str, ...] = ()) -> Path:
    """A wheel with only its METADATA, enough for `check`."""
    stem = f"{name.replace('-', '_')}-{version}"
    path = folder / f"{stem}-py3-none-any.whl"
    metadata = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
    metadata += [f"Requires-Dist: {requirement}" for requirement in requires]
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{stem}.dist-info/METADATA", "\n".join(metadata) + "\n")
    return path


@pytest.fixture
def wheels(tmp_path: Path) -> Path:
    for name, version in CARRIED.items():
        fake_wheel(tmp_path, name, version)
    return tmp_path


def test_every_requirement_of_samkd_is_carried_or_on_the_machine(wheels: Path) -> None:
    assert len(check(wheels)) == len(CARRIED)


def test_requirements_for_other_platforms_are_left_out(wheels: Path) -> None:
    fake_wheel(wheels, "loguru", CARRIED["loguru"], ("colorama>=0.3.4; sys_platform == 'win32'",))
    check(wheels)


@pytest.mark.parametrize(
    ("requirement", "message"),
    [
        ("requests>=2", "loguru needs requests>=2, which is neither carried nor on the GPU"),
        ("pydantic>=99", "loguru needs pydantic>=99, the GPU machine would have 2.14.4"),
        ("torch<2.11", "loguru needs torch<2.11, the GPU machine would have 2.11.0"),
    ],
)
def test_an_unmet_requirement_is_refused(wheels: Path, requirement: str, message: str) -> None:
    fake_wheel(wheels, "loguru", CARRIED["loguru"], (requirement,))
    with pytest.raises(WheelError, match=message):
        check(wheels)


def test_a_missing_wheel_is_refused(wheels: Path) -> None:
    next(wheels.glob("pycocotools-*.whl")).unlink()
    with pytest.raises(WheelError, match="no wheel of pycocotools; run bash benchmarks/gpu"):
        check(wheels)


def test_two_versions_of_one_wheel_are_refused(wheels: Path) -> None:
    fake_wheel(wheels, "loguru", "0.7.2")
    with pytest.raises(WheelError, match="two wheels of loguru; keep one"):
        check(wheels)


def test_a_wheel_of_another_version_is_refused(wheels: Path) -> None:
    next(wheels.glob("loguru-*.whl")).unlink()
    fake_wheel(wheels, "loguru", "0.7.2")
    with pytest.raises(WheelError, match="loguru 0.7.2, pinned 0.7.3; run bash benchmarks/gpu"):
        check(wheels)


def test_a_wheel_not_pinned_is_refused(wheels: Path) -> None:
    fake_wheel(wheels, "requests", "2.32.0")
    with pytest.raises(WheelError, match="requests is not pinned in benchmarks/gpu_wheels.py"):
        check(wheels)
