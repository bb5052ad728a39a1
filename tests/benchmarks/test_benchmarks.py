"""`python -m benchmarks --quick` runs every benchmark and writes every section."""

import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
SECTIONS = (
    "feature_store",
    "loss_cost",
    "extraction",
    "train_step",
    "lora",
    "preset_speed",
    "teacher_fast_path",
    "efficacy",
    "amg",
    "export",
    "real_size",
)


def test_quick_run_writes_every_section(tmp_path: Path) -> None:
    output = tmp_path / "BENCHMARKS.md"
    subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--output", str(output)],
        cwd=REPO_ROOT,
        check=True,
        capture_output=True,
        text=True,
    )
    text = output.read_text()
    for name in SECTIONS:
        assert f"<!-- benchmark:{name} -->" in text
        assert f"`python -m benchmarks --only {name} --quick`" in text
    assert text.count("Machine: ") == len(SECTIONS)


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
