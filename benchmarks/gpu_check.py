"""GPU check: real-size teacher and student throughput and peak memory on one CUDA device.

At 1024 px with random weights (`vit_h` teacher, `vit_t` student), in one process:

1. teacher image encoder images/s: the reference in float32 and under bf16 autocast vs the
   fast path (`samkd.models.fast_attention`: SDPA with the relative position bias as mask) in
   float32, bf16, and bf16 with torch.compile, each with the max abs difference of its
   embeddings to the float32 reference;
2. `run_extract` end to end into HDF5 (bf16 fast path, DataLoader workers), images/s and its
   ratio to the bare bf16 fast-path encoder of step 1 at the same batch size;
3. training step images/s of the student: plain fine-tuning, distillation from the features
   of step 2, and distillation from the online teacher, as ratios to plain;
4. peak GPU memory of each (`torch.cuda.max_memory_allocated`).

Results go to `gpu_check.json` and `gpu_check.md` (a BENCHMARKS.md section, to paste in) in
`--output`, rewritten after every step so a run cut short keeps what it measured.

    bash benchmarks/gpu_check.sh                                   # on a GPU machine
    python -m benchmarks.gpu_check --dry-run --output /tmp/check   # CPU, tiny presets
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from benchmarks.common import cpu_model, median
from benchmarks.extraction import timed_extraction_loop
from benchmarks.train_step import train_step_seconds
from samkd.demo.shapes import write_shapes_dataset
from samkd.extract import run_extract
from samkd.models import build_sam, optimize_teacher
from samkd.settings import load_settings

GIB = 1 << 30


@dataclass(frozen=True)
class Config:
    device: str
    teacher: str
    student: str
    image_size: int
    encoder_batch: int
    encoder_batches: int  # timed, after one warm-up batch
    distinct_images: int  # generated; the dataset repeats them under new names
    dataset_images: int
    extract_batch: int
    workers: int
    train_batch: int
    train_steps: int
    warmup_steps: int  # dropped from the training timing
    compile: bool  # also time the teacher fast path under torch.compile


GPU = Config(
    device="cuda",
    teacher="vit_h",
    student="vit_t",
    image_size=1024,
    encoder_batch=8,
    encoder_batches=6,
    distinct_images=24,
    dataset_images=192,
    extract_batch=8,
    workers=8,
    train_batch=8,
    train_steps=20,
    warmup_steps=5,
    compile=True,
)
DRY_RUN = Config(
    device="cpu",
    teacher="vit_mini",
    student="vit_t_mini",
    image_size=256,
    encoder_batch=2,
    encoder_batches=1,
    distinct_images=2,
    dataset_images=4,
    extract_batch=2,
    workers=0,
    train_batch=1,
    train_steps=1,
    warmup_steps=0,
    compile=False,
)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    """Peak GPU memory allocated by torch since `reset_peak`; None on the CPU."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / GIB


def autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager[Any]:
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


# (name, bf16 autocast, fast path, torch.compile); the fast path is samkd.models.fast_attention.
ENCODER_VARIANTS = (
    ("fp32", False, False, False),
    ("bf16", True, False, False),
    ("fast_fp32", False, True, False),
    ("fast", True, True, False),
    ("fast_compile", True, True, True),
)
ENCODER_LABELS = {
    "fp32": "fp32 reference",
    "bf16": "bf16 reference",
    "fast_fp32": "fast path fp32 (SDPA)",
    "fast": "fast path (bf16 + SDPA)",
    "fast_compile": "fast path + compile",
}


def encoder_throughput(config: Config, device: torch.device) -> dict[str, Any]:
    """Teacher image encoder images/s, peak memory and max abs difference of the embeddings
    to the float32 reference, for each of `ENCODER_VARIANTS`."""
    model = build_sam(config.teacher, image_size=config.image_size).to(device).eval()
    with torch.no_grad():  # random weights, but non-zero relative positions
        for name, parameter in model.image_encoder.named_parameters():
            if "rel_pos" in name:
                parameter.normal_(0.0, 0.1)
    size = config.image_size
    batch = torch.randn(config.encoder_batch, 3, size, size, device=device)
    results: dict[str, Any] = {}
    reference: torch.Tensor | None = None
    for name, bf16, fast, compiled in ENCODER_VARIANTS:
        if compiled and not config.compile:
            continue
        reset_peak(device)
        handle = optimize_teacher(model, compile=compiled) if fast else None
        try:
            with torch.inference_mode(), autocast(device, bf16):
                began = time.perf_counter()
                output = model.image_encoder(batch).float()
                synchronize(device)
                first_call_s = time.perf_counter() - began
                began = time.perf_counter()
                for _ in range(config.encoder_batches):
                    model.image_encoder(batch)
                synchronize(device)
                seconds = time.perf_counter() - began
        finally:
            if handle is not None:
                handle.remove()
        if reference is None:
            reference = output
        images = config.encoder_batch * config.encoder_batches
        results[name] = {
            "name": name,
            "images_per_s": images / seconds,
            "peak_gib": peak_gib(device),
            "first_call_s": first_call_s,
            "max_abs_diff": (output - reference).abs().max().item(),
            "reference_max_abs": reference.abs().max().item(),
        }
    fp32 = results["fp32"]["images_per_s"]
    for name in results.copy():
        if name != "fp32":
            results[f"{name}_over_fp32"] = results[name]["images_per_s"] / fp32
    results["fast_over_bf16"] = results["fast"]["images_per_s"] / results["bf16"]["images_per_s"]
    del model
    return results


def make_dataset(config: Config, root: Path) -> Path:
    """`dataset_images` images with masks: a few generated ones repeated under new ids."""
    width = config.image_size
    source = write_shapes_dataset(
        root / "distinct", config.distinct_images, (width * 3 // 4, width)
    )
    dataset = root / "train"
    for index in range(config.dataset_images):
        original = f"shape_{index % config.distinct_images:05d}"
        copy = f"image_{index:05d}"
        (dataset / "image").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / "image" / f"{original}.png", dataset / "image" / f"{copy}.png")
        shutil.copytree(source / "mask" / original, dataset / "mask" / copy)
    return dataset


def teacher_entry(config: Config) -> str:
    return f"teachers=[{{name: teacher, model_type: {config.teacher}}}]"


def extraction_throughput(
    config: Config, device: torch.device, data: Path, output: Path, bare: dict[str, Any]
) -> dict[str, Any]:
    """`bare`: the teacher encoder result at the precision extraction runs in."""
    settings = load_settings(
        None,
        [
            f"data.train={data}",
            f"data.image_size={config.image_size}",
            f"data.num_workers={config.workers}",
            teacher_entry(config),
            f"extract.output={output}",
            f"extract.batch_size={config.extract_batch}",
            f"extract.device={config.device}",
        ],
        environ={},
    )
    reset_peak(device)
    loop: list[float] = []
    batch_ends: list[float] = []
    began = time.perf_counter()
    with timed_extraction_loop(loop, batch_ends):
        run_extract(settings, console=Console(quiet=True))
    total = time.perf_counter() - began
    images = config.dataset_images
    bare_images_per_s = bare["images_per_s"]
    steady_images_per_s = (images - config.extract_batch) / (batch_ends[-1] - batch_ends[0])
    return {
        "baseline": bare["name"],
        "images": images,
        "batch_size": config.extract_batch,
        "images_per_s": images / total,
        "loop_images_per_s": images / sum(loop),
        "efficiency": images / total / bare_images_per_s,
        "loop_efficiency": images / sum(loop) / bare_images_per_s,
        "steady_images_per_s": steady_images_per_s,
        "steady_efficiency": steady_images_per_s / bare_images_per_s,
        "peak_gib": peak_gib(device),
    }


def training_throughput(
    config: Config, device: torch.device, data: Path, features: Path, workdir: Path
) -> dict[str, Any]:
    common = [
        f"data.train={data}",
        f"data.image_size={config.image_size}",
        f"data.num_workers={config.workers}",
        f"student.model_type={config.student}",
        f"train.batch_size={config.train_batch}",
        "train.warmup_steps=0",
        f"train.device={config.device}",
        "logging.log_every=1",
        "logging.tensorboard=false",
    ]
    modes = {
        "plain": [],
        "precomputed": [teacher_entry(config), f"distillation.features={features}"],
        "online": [teacher_entry(config), "distillation.use_precomputed_features=false"],
    }
    results: dict[str, Any] = {}
    for mode, extra in modes.items():
        reset_peak(device)
        steps = train_step_seconds(
            [*common, *extra],
            config.train_steps,
            config.warmup_steps,
            config.train_batch,
            workdir / f"run-{mode}",
        )
        step_s = median(steps)
        results[mode] = {
            "median_step_s": step_s,
            "images_per_s": config.train_batch / step_s,
            "peak_gib": peak_gib(device),
        }
    plain = results["plain"]["median_step_s"]
    results["precomputed_over_plain"] = results["precomputed"]["median_step_s"] / plain
    results["online_over_plain"] = results["online"]["median_step_s"] / plain
    return results


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()


def gib(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def markdown(results: dict[str, Any]) -> str:
    config = results["config"]
    lines = [
        "<!-- benchmark:gpu_check -->",
        f"## GPU check: {config['teacher']} teacher, {config['student']} student at "
        f"{config['image_size']} px" + (" (dry run)" if results["dry_run"] else ""),
        "",
        f"Command: `{results['command']}` ({results['seconds']:.0f} s)  ",
        f"Machine: {results['device']}, torch {results['torch']}, CUDA {results['cuda']}, "
        f"{results['date']}",
        "",
        "Random weights (relative positions non-zero). Teacher: image encoder alone, the "
        "reference in float32 and under bf16 autocast vs the fast path "
        "(`samkd.models.fast_attention`: SDPA with the relative position bias as mask; in "
        "float32, under bf16 autocast, and with torch.compile), with the max abs difference of "
        "the embeddings to the float32 reference. Extraction: `run_extract` end to end into "
        "HDF5 (bf16 fast path on CUDA, "
        f"{config['workers']} DataLoader workers) vs the bare encoder at the same batch size "
        "and precision; *loop only* leaves out the fixed setup (plan, shape probe on the CPU, "
        "model builds, shard join). Training: median step after warm-up, task loss plus the "
        "default objective, as ratios to plain fine-tuning measured in the same run.",
        "",
        "| measurement | images/s | ratio | peak GPU memory (GiB) |",
        "|---|---:|---:|---:|",
    ]
    encoder = results.get("teacher_encoder")
    if encoder:
        for name, label in ENCODER_LABELS.items():
            if name not in encoder:
                continue
            value = encoder[name]
            rate = value["images_per_s"]
            relative = rate / encoder["fp32"]["images_per_s"]
            difference = ""
            if name != "fp32":
                difference = (
                    f", max abs diff {value['max_abs_diff']:.1e} "
                    f"(of {value['reference_max_abs']:.1f})"
                )
            first = ""
            if name == "fast_compile":
                first = f", first call {value['first_call_s']:.0f} s"
            lines.append(
                f"| teacher encoder {label}, batch {config['encoder_batch']}{difference}{first} | "
                f"{rate:.2f} | {relative:.2f}x fp32 | {gib(value['peak_gib'])} |"
            )
    extraction = results.get("extraction")
    if extraction:
        lines.append(
            f"| extraction end to end, {extraction['images']} images, batch "
            f"{extraction['batch_size']} | {extraction['images_per_s']:.2f} | "
            f"{extraction['efficiency']:.2f}x bare {extraction['baseline']} | "
            f"{gib(extraction['peak_gib'])} |"
        )
        lines.append(
            f"| extraction loop only | {extraction['loop_images_per_s']:.2f} | "
            f"{extraction['loop_efficiency']:.2f}x bare {extraction['baseline']} | |"
        )
        lines.append(
            f"| extraction steady state (after the first batch) | "
            f"{extraction['steady_images_per_s']:.2f} | "
            f"{extraction['steady_efficiency']:.2f}x bare {extraction['baseline']} | |"
        )
    training = results.get("train")
    if training:
        plain = training["plain"]["images_per_s"]
        for mode in ("plain", "precomputed", "online"):
            rate = training[mode]["images_per_s"]
            lines.append(
                f"| train step {mode}, batch {config['train_batch']} | {rate:.2f} | "
                f"{plain / rate:.2f}x plain step time | {gib(training[mode]['peak_gib'])} |"
            )
    lines.append("<!-- /benchmark:gpu_check -->")
    return "\n".join(lines) + "\n"


def write_results(results: dict[str, Any], output: Path) -> None:
    output.mkdir(parents=True, exist_ok=True)
    (output / "gpu_check.json").write_text(json.dumps(results, indent=2) + "\n")
    (output / "gpu_check.md").write_text(markdown(results))


@contextlib.contextmanager
def temporary_folder() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="samkd-gpu-check-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def run_check(config: Config, output: Path, command: str) -> dict[str, Any]:
    """Every measurement, in order; results are written after each one."""
    device = torch.device(config.device)
    began = time.perf_counter()
    results: dict[str, Any] = {
        "device": device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "dry_run": config.device == "cpu",
        "command": command,
        "config": asdict(config),
        "seconds": 0.0,
    }

    def save(key: str, value: dict[str, Any]) -> None:
        results[key] = value
        results["seconds"] = time.perf_counter() - began
        write_results(results, output)
        print(f"{key}: {json.dumps(value)}", flush=True)

    torch.manual_seed(0)
    save("teacher_encoder", encoder_throughput(config, device))
    with temporary_folder() as workdir:
        data = make_dataset(config, workdir)
        features = workdir / "features.h5"
        # Extraction runs the fast path on CUDA (extract.fast_teacher=auto), fp32 on the CPU.
        bare = results["teacher_encoder"]["fast" if device.type == "cuda" else "fp32"]
        save("extraction", extraction_throughput(config, device, data, features, bare))
        save("train", training_throughput(config, device, data, features, workdir))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny presets, 1 step")
    parser.add_argument("--output", type=Path, default=Path("gpu-results"))
    args = parser.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device; use --dry-run to check the script on the CPU")
    config = DRY_RUN if args.dry_run else GPU
    command = "bash benchmarks/gpu_check.sh"
    if args.dry_run:
        command = "python -m benchmarks.gpu_check --dry-run"
    run_check(config, args.output, command)
    print(f"wrote {args.output / 'gpu_check.json'} and {args.output / 'gpu_check.md'}")


if __name__ == "__main__":
    main()
