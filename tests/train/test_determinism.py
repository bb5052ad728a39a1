"""CPU training is bitwise reproducible at the default thread count, on a loaded machine too."""

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from samkd.models import load_state_dict_file
from samkd.train import run_train
from samkd.train.metrics_log import read_metrics

from .conftest import ALL_TERMS, base_assignments, make_settings

# Wall-clock and throughput fields differ between any two runs.
TIMING_FIELDS = {"images_per_s"}


def loss_records(run_dir: Path) -> list[dict]:
    return [
        {k: v for k, v in record.items() if k not in TIMING_FIELDS}
        for record in read_metrics(run_dir / "metrics.jsonl")
    ]


@contextmanager
def busy_cpu() -> Iterator[None]:
    """A process spinning on one core while the block runs. The CPU kernels that race (parallel
    float atomics, e.g. `index_put_(accumulate=True)`, the backward of TinyViT's attention-bias
    lookup) give the same sums on an idle machine, where their threads keep step, and differ
    when a thread is preempted: this makes that happen, as other jobs on a shared machine do."""
    process = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield
    finally:
        process.kill()
        process.wait()


def test_cpu_training_is_bitwise_reproducible_with_default_threads(
    tmp_path: Path, shapes: Path, teacher_checkpoint: Path, feature_file: Path
) -> None:
    # No OMP_NUM_THREADS override: the default thread count (one per core).
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    runs = []
    with busy_cpu():
        for name in ("first", "second"):
            settings = make_settings(
                *base_assignments(shapes, teacher_checkpoint, tmp_path / name),
                *ALL_TERMS,
                f"distillation.features={feature_file}",
                "train.device=cpu",
                "train.steps=6",
            )
            run_train(settings)
            runs.append(tmp_path / name)
    first, second = runs
    assert loss_records(first) == loss_records(second)
    left = load_state_dict_file(first / "student.pt")
    right = load_state_dict_file(second / "student.pt")
    assert left.keys() == right.keys()
    differing = [key for key in left if not torch.equal(left[key], right[key])]
    assert not differing, f"{len(differing)} tensors differ, e.g. {differing[:3]}"
    # Deterministic mode is process-wide: training restores the setting it found.
    assert torch.are_deterministic_algorithms_enabled() == deterministic_before
