"""Real-size models on the CPU: `vit_h` extraction at 1024 px, then `vit_t` training steps
from the stored features, each in a fresh interpreter that reports its wall time and peak
resident memory (random weights: the cost does not depend on them).

    python -m benchmarks --only real_size
    python -m benchmarks.real_size --case extract --work DIR   # one case, JSON last line
    python -m benchmarks.real_size --case train --work DIR     # needs the extract case's file

`--quick` runs the same cases on the small presets (`vit_mini`, `vit_t_mini`, 128 px).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.console import Console

from benchmarks.common import ResultTable, Section
from samkd.demo.shapes import write_shapes_dataset
from samkd.extract import run_extract
from samkd.features import FeatureStore
from samkd.settings import Settings, load_settings
from samkd.train import run_train
from samkd.train.metrics_log import read_metrics

NAME = "real_size"
REPO_ROOT = Path(__file__).resolve().parents[1]
CASES = ("extract", "train")


@dataclass(frozen=True)
class Size:
    teacher: str
    student: str
    image_size: int
    images: int
    train_steps: int


FULL_SIZE = Size("vit_h", "vit_t", 1024, images=2, train_steps=3)
QUICK_SIZE = Size("vit_mini", "vit_t_mini", 128, images=2, train_steps=3)


def settings_for(work: Path, size: Size, *assignments: str) -> Settings:
    """One teacher of `size.teacher` with random weights, the student `size.student`, one
    image a batch."""
    return load_settings(
        None,
        [
            f"data.train={work / 'data'}",
            f"data.image_size={size.image_size}",
            "data.num_workers=0",
            f"student.model_type={size.student}",
            f"teachers=[{{name: teacher, model_type: {size.teacher}}}]",
            f"extract.output={work / 'features.h5'}",
            "extract.batch_size=1",
            *assignments,
        ],
        environ={},
    )


def peak_rss_mib() -> float:
    """This process's peak resident set size so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def extract_case(work: Path, size: Size) -> dict[str, object]:
    write_shapes_dataset(work / "data", size.images, (size.image_size, size.image_size))
    settings = settings_for(work, size)
    torch.manual_seed(0)
    start = time.perf_counter()
    run_extract(settings, console=Console(quiet=True))
    seconds = time.perf_counter() - start
    store = FeatureStore(settings.extract.output)
    try:
        embedding = store.read(0)["teacher"]["encoder.embed"]
    finally:
        store.close()
    return {
        "seconds": seconds,
        "seconds_per_image": seconds / size.images,
        "peak_mib": peak_rss_mib(),
        "embedding_shape": list(embedding.shape),
        "file_mib": settings.extract.output.stat().st_size / 2**20,
    }


def train_case(work: Path, size: Size) -> dict[str, object]:
    """`size.train_steps` steps of batch 1 with the encoder and decoder terms, from the extract
    case's feature file: the wall time (building the student included) and the last step's
    time (as logged)."""
    run_dir = work / "run"
    settings = settings_for(
        work,
        size,
        f"distillation.features={work / 'features.h5'}",
        "distillation.decoder.enabled=true",
        f"train.steps={size.train_steps}",
        "train.batch_size=1",
        f"train.output_dir={run_dir}",
        "train.device=cpu",
        "logging.log_every=1",
        "logging.tensorboard=false",
    )
    start = time.perf_counter()
    result = run_train(settings, console=Console(quiet=True))
    seconds = time.perf_counter() - start
    student = torch.load(run_dir / "student.pt", map_location="cpu", weights_only=True)
    last_step = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"][-1]
    return {
        "seconds": seconds,
        "seconds_per_step": 1 / last_step["images_per_s"],
        "peak_mib": peak_rss_mib(),
        "steps": result.steps,
        "student_parameters": sum(tensor.numel() for tensor in student.values()),
    }


def run_case(case: str, work: Path, quick: bool) -> dict[str, object]:
    size = QUICK_SIZE if quick else FULL_SIZE
    result = extract_case(work, size) if case == "extract" else train_case(work, size)
    return {"case": case, **asdict(size), **result}


def measure_in_subprocess(case: str, work: Path, quick: bool) -> dict[str, object]:
    """One case in a fresh interpreter, so that its peak memory is its own."""
    command = [sys.executable, "-m", "benchmarks.real_size", "--case", case, "--work", str(work)]
    command += ["--quick"] if quick else []
    completed = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT)
    if completed.returncode != 0:
        raise RuntimeError(f"real-size case {case} failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def run(quick: bool = False) -> Section:
    size = QUICK_SIZE if quick else FULL_SIZE
    with tempfile.TemporaryDirectory(prefix="samkd-real-size-") as folder:
        extract = measure_in_subprocess("extract", Path(folder), quick)
        train = measure_in_subprocess("train", Path(folder), quick)
    table = ResultTable(["job", "what", "wall s", "per item s", "peak RSS (MiB)"])
    table.add(
        "extract",
        f"`{size.teacher}` teacher, {size.images} images, embedding "
        f"{' x '.join(map(str, extract['embedding_shape']))}",
        f"{extract['seconds']:.1f}",
        f"{extract['seconds_per_image']:.1f} / image",
        f"{extract['peak_mib']:.0f}",
    )
    table.add(
        "train",
        f"`{size.student}` student, {size.train_steps} steps of batch 1, encoder + decoder terms",
        f"{train['seconds']:.1f}",
        f"{train['seconds_per_step']:.1f} / step (the last)",
        f"{train['peak_mib']:.0f}",
    )
    return Section(
        NAME,
        "Real-size models on the CPU",
        (
            f"`samkd extract` with a `{size.teacher}` teacher (random weights) on "
            f"{size.images} generated {size.image_size} x {size.image_size} images, then "
            f"`samkd train` of a `{size.student}` student at {size.image_size} px from that "
            "file (encoder MSE and the decoder terms against the stored teacher decoder), each "
            "in a fresh interpreter. Wall time includes building the models; peak RSS is the "
            "process's peak resident set size."
        ),
        [table],
        [f"{torch.get_num_threads()} torch threads; one image per batch."],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=CASES, required=True)
    parser.add_argument("--work", type=Path, required=True, help="folder shared by the cases")
    parser.add_argument("--quick", action="store_true", help="small presets at 128 px")
    args = parser.parse_args()
    print(json.dumps(run_case(args.case, args.work, args.quick)))


if __name__ == "__main__":
    main()
