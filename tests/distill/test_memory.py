"""Bounded memory of the chunked terms at real sizes.

Each case runs in a fresh interpreter (`python -m benchmarks.loss_cost --case`), which reports
its peak resident set size minus its resident set size before the term: an upper bound on the extra
memory, that sees every CPU allocation torch makes (tracemalloc does not). glibc's mmap threshold
is fixed (`MALLOC_MMAP_THRESHOLD_`), so that each freed large block goes back to the system at
once; by default the heap keeps a varying share of them, and the reading wandered with the torch
build (RKD with 256 sampled positions: 320-400 MiB under torch 2.14, 390-550 under 2.11).

Measured on a 2-core CPU (torch 2.14 / 2.11): ViT-H global block coarse map (16 heads x 4096
tokens, head_dim 80, chunk 1024, no grad) 65 / 73 MiB, where the full map alone would be 1 GiB;
TinyViT windowed student coarse map + KL + backward 50 / 66 MiB; RKD on a 256 x 64 x 64
embedding, forward and backward, 37 / 57 MiB on the 8 x 8 grid and 111 / 131 MiB with 256
sampled positions (angle tensor 256^3, accumulated in chunks; 398 MiB unchunked).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LIMIT_MIB = 256
# Any block of at least 128 KiB is mapped on its own and unmapped when freed.
FIXED_MMAP_THRESHOLD = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}


@pytest.mark.slow
@pytest.mark.parametrize(
    "case", ["attention_teacher", "attention_student", "rkd_grid", "rkd_sample"]
)
def test_peak_memory_stays_bounded(case):
    command = [sys.executable, "-m", "benchmarks.loss_cost", "--case", case, "--repeats", "0"]
    environment = {**os.environ, **FIXED_MMAP_THRESHOLD}
    completed = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=environment)
    assert completed.returncode == 0, completed.stderr[-2000:]
    output = completed.stdout
    peak_mib = json.loads(output.strip().splitlines()[-1])["peak_mib"]
    assert peak_mib < LIMIT_MIB, f"{case}: {peak_mib:.0f} MiB"
