"""The GPU check's dry run: the whole script on the CPU with tiny presets."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_dry_run_writes_every_result(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check", "--dry-run", "--output", str(tmp_path)],
        cwd=REPO_ROOT,
        check=True,
        capture_output=True,
        text=True,
    )
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
