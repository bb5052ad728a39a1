"""`python -m benchmarks --quick` runs every benchmark and writes every section."""

import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.__main__ import BENCHMARKS

REPO_ROOT = Path(__file__).resolve().parents[2]
# The sections' quick runs take 2 minutes together; the longest (the three that took a minute
# and a quarter, and `view`, which starts servers and a browser) run with `nox -s slow`.
FAST_SECTIONS = (
    "feature_store",
    "extraction",
    "train_step",
    "lora",
    "preset_speed",
    "teacher_fast_path",
    "amg",
    "export",
)
SLOW_SECTIONS = ("loss_cost", "efficacy", "real_size", "view", "frames", "sam2_efficacy")
# Its own test, so that its time shows: three `samkd` commands on 200 images, 16 real-size rows.
SCALE_SECTION = ("scale",)


def assert_quick_run_writes(sections: tuple[str, ...], output: Path) -> None:
    only = [argument for name in sections for argument in ("--only", name)]
    subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", *only, "--output", str(output)],
        cwd=REPO_ROOT,
        check=True,
        capture_output=True,
        text=True,
    )
    text = output.read_text()
    for name in sections:
        assert f"<!-- benchmark:{name} -->" in text
        assert f"`python -m benchmarks --only {name} --quick`" in text
    assert text.count("Machine: ") == len(sections)


def test_every_section_is_checked() -> None:
    assert set(FAST_SECTIONS + SLOW_SECTIONS + SCALE_SECTION) == set(BENCHMARKS)


def test_quick_run_writes_every_fast_section(tmp_path: Path) -> None:
    assert_quick_run_writes(FAST_SECTIONS, tmp_path / "BENCHMARKS.md")


def test_quick_run_writes_the_scale_section(tmp_path: Path) -> None:
    output = tmp_path / "BENCHMARKS.md"
    assert_quick_run_writes(SCALE_SECTION, output)
    text = output.read_text()
    assert "3. Projections: computed from the anchors and this run's reads, not measured" in text
    assert "Target: a copy join copies at most once: it wrote 1.00x" in text


@pytest.mark.slow
def test_quick_run_writes_every_slow_section(tmp_path: Path) -> None:
    assert_quick_run_writes(SLOW_SECTIONS, tmp_path / "BENCHMARKS.md")


def test_only_keeps_the_other_sections(tmp_path: Path) -> None:
    output = tmp_path / "BENCHMARKS.md"
    output.write_text(
        "# old\n\n<!-- benchmark:gpu_check -->\n## GPU\nkept\n<!-- /benchmark:gpu_check -->\n"
    )
    subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--only", "preset_speed"]
        + ["--output", str(output)],
        cwd=REPO_ROOT,
        check=True,
        capture_output=True,
        text=True,
    )
    text = output.read_text()
    assert "<!-- benchmark:preset_speed -->" in text
    assert "## GPU\nkept\n" in text
    assert "<!-- benchmark:train_step -->" not in text
