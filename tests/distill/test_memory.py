"""Bounded memory of the chunked terms at real sizes.

Each case runs in a fresh interpreter (`python -m benchmarks.loss_cost --case`), which reports
its peak resident set size minus its resident set size before the term: an upper bound on the extra
memory, that sees every CPU allocation torch makes (tracemalloc does not).

Measured on a 2-core CPU (torch 2.14): ViT-H global block coarse map (16 heads x 4096 tokens,
head_dim 80, chunk 1024, no grad) about 115 MiB, where the full map alone would be 1 GiB;
TinyViT windowed student coarse map + KL + backward about 280 MiB; RKD on a 256 x 64 x 64
embedding, forward and backward, about 75 MiB on the 8 x 8 grid and 330 MiB with 256 sampled
positions (angle tensor 256^3, accumulated in chunks).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LIMIT_MIB = 512


@pytest.mark.slow
@pytest.mark.parametrize(
    "case", ["attention_teacher", "attention_student", "rkd_grid", "rkd_sample"]
)
def test_peak_memory_stays_bounded(case):
    command = [sys.executable, "-m", "benchmarks.loss_cost", "--case", case, "--repeats", "0"]
    completed = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    assert completed.returncode == 0, completed.stderr[-2000:]
    output = completed.stdout
    peak_mib = json.loads(output.strip().splitlines()[-1])["peak_mib"]
    assert peak_mib < LIMIT_MIB, f"{case}: {peak_mib:.0f} MiB"
