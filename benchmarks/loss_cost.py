"""Time and peak memory of each distillation term at real MobileSAM / ViT-H sizes.

Batch 1, 1024 px input: `encoder.embed` 256 x 64 x 64, `decoder.upscaled` 32 x 256 x 256,
3 masks of 256 x 256, a ViT-H global attention block (16 heads x 4096 tokens, head_dim 80, with
relative positions) as teacher and TinyViT's last windowed block (10 heads, 64 x 64 tokens,
window 7, padded to 70 x 70, with attention biases) as student, RKD on the 64 x 64 embedding.

Each term runs in its own subprocess (forward, and backward where the student needs gradients).
Peak memory is the process's peak resident set size after the run minus its resident set size
just before it, both read from the kernel: an upper bound on the extra memory the term needed,
which sees every allocation torch makes on the CPU.

    python -m benchmarks.loss_cost                     # table on stdout
    python -m benchmarks.loss_cost --markdown out.md   # also write a markdown section
    python -m benchmarks.loss_cost --case rkd_grid     # one term, as JSON
    python -m benchmarks --only loss_cost              # as a BENCHMARKS.md section
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from benchmarks.common import NOISE_NOTE, ResultTable, Section
from samkd.distill.attention import attention_kl, coarse_attention_map, coarse_attention_support
from samkd.distill.decoder import cosine_distance, mask_logit_kl
from samkd.distill.encoder import encoder_kl, feature_mse
from samkd.distill.rkd import (
    grid_patches,
    rkd_angle_loss,
    rkd_distance_loss,
    sample_positions,
    sampled_patches,
)
from samkd.models.attention_capture import AttentionCapture

NAME = "loss_cost"
MIB = 1 << 20
REPO_ROOT = Path(__file__).resolve().parents[1]
BASELINE = "encoder_mse"
# Cheap terms for `--quick`: the baseline and one decoder term.
QUICK_CASES = ("encoder_mse", "decoder_kl")


def pair(*shape: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A student feature that needs gradients and a teacher feature that does not."""
    return torch.randn(*shape, requires_grad=True), torch.randn(*shape)


def vit_h_global_block(requires_grad: bool = False) -> AttentionCapture:
    tokens, heads, head_dim = 64 * 64, 16, 80
    return AttentionCapture(
        query=torch.randn(1, heads, tokens, head_dim, requires_grad=requires_grad),
        key=torch.randn(1, heads, tokens, head_dim, requires_grad=requires_grad),
        scale=head_dim**-0.5,
        grid=(64, 64),
        window=0,
        padded_grid=(64, 64),
        rel_pos_h=torch.randn(1, heads, tokens, 64),
        rel_pos_w=torch.randn(1, heads, tokens, 64),
    )


def tiny_vit_windowed_block() -> AttentionCapture:
    windows, heads, head_dim, tokens = 100, 10, 32, 49
    return AttentionCapture(
        query=torch.randn(windows, heads, tokens, head_dim, requires_grad=True),
        key=torch.randn(windows, heads, tokens, head_dim, requires_grad=True),
        scale=head_dim**-0.5,
        grid=(64, 64),
        window=7,
        padded_grid=(70, 70),
        bias=torch.randn(heads, tokens, tokens, requires_grad=True),
    )


def case_encoder_mse() -> Callable[[], None]:
    student, teacher = pair(1, 256, 64, 64)
    return lambda: feature_mse(student, teacher).backward()


def case_encoder_kl() -> Callable[[], None]:
    student, teacher = pair(1, 256, 64, 64)
    return lambda: encoder_kl(student, teacher, 2.0, "spatial").backward()


def case_decoder_mse() -> Callable[[], None]:
    student, teacher = pair(1, 32, 256, 256)
    return lambda: feature_mse(student, teacher).backward()


def case_decoder_cosine() -> Callable[[], None]:
    student, teacher = pair(1, 32, 256, 256)
    return lambda: cosine_distance(student, teacher).backward()


def case_decoder_kl() -> Callable[[], None]:
    student, teacher = pair(1, 3, 256, 256)
    return lambda: mask_logit_kl(student, teacher, 2.0).backward()


def case_attention_teacher() -> Callable[[], None]:
    capture = vit_h_global_block()

    def run() -> None:
        with torch.no_grad():
            coarse_attention_map(capture, 16, 1024)

    return run


def case_attention_student() -> Callable[[], None]:
    capture = tiny_vit_windowed_block()
    teacher_map = torch.softmax(torch.randn(1, 256, 256), dim=-1)
    support = coarse_attention_support(capture, 16)

    def run() -> None:
        student_map = coarse_attention_map(capture, 16, 1024)
        attention_kl(student_map, teacher_map, support).backward()

    return run


def rkd_case(patches: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], None]:
    student, teacher = pair(1, 256, 64, 64)

    def run() -> None:
        student_points, teacher_points = patches(student), patches(teacher)
        loss = rkd_distance_loss(student_points, teacher_points)
        (loss + 2.0 * rkd_angle_loss(student_points, teacher_points)).backward()

    return run


def case_rkd_grid() -> Callable[[], None]:
    return rkd_case(lambda features: grid_patches(features, 8))


def case_rkd_sample() -> Callable[[], None]:
    positions = sample_positions(1, 64 * 64, 256, torch.Generator().manual_seed(0))
    return rkd_case(lambda features: sampled_patches(features, positions))


CASES: dict[str, tuple[str, Callable[[], Callable[[], None]]]] = {
    "encoder_mse": ("MSE, embed 256x64x64, fwd+bwd", case_encoder_mse),
    "encoder_kl": ("spatial KL, embed 256x64x64, fwd+bwd", case_encoder_kl),
    "decoder_mse": ("MSE, upscaled 32x256x256, fwd+bwd", case_decoder_mse),
    "decoder_cosine": ("cosine, upscaled 32x256x256, fwd+bwd", case_decoder_cosine),
    "decoder_kl": ("Bernoulli KL, 3 masks 256x256, fwd+bwd", case_decoder_kl),
    "attention_teacher": (
        "coarse map G=16, ViT-H global 16x4096, chunk 1024, no grad",
        case_attention_teacher,
    ),
    "attention_student": (
        "coarse map + KL G=16, TinyViT 10 heads 100 windows of 7x7, fwd+bwd",
        case_attention_student,
    ),
    "rkd_grid": ("distance + angle, 8x8 pooled grid of 256x64x64, fwd+bwd", case_rkd_grid),
    "rkd_sample": ("distance + angle, 256 sampled of 256x64x64, fwd+bwd", case_rkd_sample),
}


def resident_bytes() -> int:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize()


def peak_resident_bytes() -> int:
    """This process's peak resident set (VmHWM). Not `ru_maxrss`: Linux carries that over
    from the parent across fork and exec, so a case started by a large process (a test
    session) would report the parent's size."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_case(name: str, repeats: int) -> dict[str, float]:
    """Time and peak extra memory of one case, in this process."""
    torch.manual_seed(0)
    run = CASES[name][1]()
    before = resident_bytes()
    times = []
    for _ in range(1 + repeats):  # the first run warms up; its time counts only when alone
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    peak = peak_resident_bytes()
    seconds = min(times[1:]) if repeats else times[0]
    return {"seconds": seconds, "peak_mib": max(peak - before, 0) / MIB}


def measure_in_subprocess(name: str, repeats: int) -> dict[str, float]:
    command = [sys.executable, "-m", "benchmarks.loss_cost", "--case", name]
    command += ["--repeats", str(repeats)]
    output = subprocess.run(
        command, check=True, capture_output=True, text=True, cwd=REPO_ROOT
    ).stdout
    return json.loads(output.strip().splitlines()[-1])


def markdown(results: dict[str, dict[str, float]]) -> str:
    lines = [
        "## Distillation loss cost",
        "",
        f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}, batch 1 at 1024 px. "
        "Peak = peak resident set minus resident set before the term (upper bound).",
        "",
        "| term | what | time (ms) | peak extra (MiB) |",
        "|---|---|---:|---:|",
    ]
    for name, result in results.items():
        lines.append(
            f"| {name} | {CASES[name][0]} | {result['seconds'] * 1e3:.1f} | "
            f"{result['peak_mib']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def measure_cases(names: Sequence[str], repeats: int) -> dict[str, dict[str, float]]:
    results = {}
    for name in names:
        # The ViT-H attention coarsening alone takes seconds; one timed run is enough.
        case_repeats = min(1, repeats) if name == "attention_teacher" else repeats
        results[name] = measure_in_subprocess(name, case_repeats)
    return results


def section(results: dict[str, dict[str, float]], repeats: int) -> Section:
    baseline = results[BASELINE]["seconds"]
    timing = (
        f"fastest of {repeats} timed runs after a warm-up (one for `attention_teacher`)"
        if repeats
        else "a single run, warm-up included"
    )
    table = ResultTable(["term", "what", "time (ms)", f"time / {BASELINE}", "peak extra (MiB)"])
    for name, result in results.items():
        table.add(
            name,
            CASES[name][0],
            f"{result['seconds'] * 1e3:.1f}",
            f"{result['seconds'] / baseline:.1f}x",
            f"{result['peak_mib']:.0f}",
        )
    return Section(
        name=NAME,
        title="Distillation loss cost",
        description=(
            "Each distillation term alone at real MobileSAM / ViT-H sizes, batch 1 at 1024 px, "
            f"in its own subprocess: {timing}. Peak = the "
            "process's peak resident set minus its resident set before the term (an upper "
            f"bound on the extra memory). Ratios are to `{BASELINE}`, the plainest term, "
            "measured in the same run."
        ),
        tables=[table],
        notes=[NOISE_NOTE],
    )


def run(quick: bool = False) -> Section:
    names, repeats = (QUICK_CASES, 0) if quick else (tuple(CASES), 3)
    return section(measure_cases(names, repeats), repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=sorted(CASES), help="run one term and print JSON")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs after a warm-up")
    parser.add_argument("--markdown", type=Path, help="also write the table to this file")
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.repeats)))
        return
    results = {}
    for name in CASES:
        results.update(measure_cases([name], args.repeats))
        seconds, peak = results[name]["seconds"], results[name]["peak_mib"]
        print(f"{name:<18} {seconds * 1e3:10.1f} ms {peak:8.0f} MiB", flush=True)
    table = markdown(results)
    if args.markdown:
        args.markdown.write_text(table)
    print()
    print(table)


if __name__ == "__main__":
    main()
