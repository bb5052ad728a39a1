"""ONNX export of the real-size MobileSAM (`vit_t` at 1024 px, random weights): onnxruntime
vs PyTorch CPU latency of the image encoder and of the decoder, fp32 and int8, with the
parity figures `samkd export` checks.

    python -m benchmarks --only export
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from benchmarks.common import NOISE_NOTE, ResultTable, Section
from samkd.evaluate.onnx_session import INT8, OnnxFiles, OnnxSam, measure_onnx_speed
from samkd.evaluate.speed import SpeedReport, measure_speed
from samkd.export import run_export
from samkd.models import build_sam
from samkd.settings import load_settings

NAME = "export"
FULL = ("vit_t", 1024)
QUICK = ("vit_t_mini", 128)
WARMUP, REPEATS = 2, 5


def export_pair(model_type: str, image_size: int, folder: Path) -> dict[str, Any]:
    """`samkd export` of random weights to `folder`, with int8: its `parity.json` content."""
    settings = load_settings(
        None,
        [
            f"student.model_type={model_type}",
            f"data.image_size={image_size}",
            f"export.output={folder}",
            f"export.quantize={INT8}",
            "export.parity_images=2",
        ],
        environ={},
    )
    torch.manual_seed(0)
    return run_export(settings, console=Console(quiet=True))


def latencies(model_type: str, image_size: int, folder: Path) -> dict[str, SpeedReport]:
    model = build_sam(model_type, image_size=image_size)
    reports = {"PyTorch fp32": measure_speed(model, 1, WARMUP, REPEATS)}
    for label, variant in (("onnxruntime fp32", ""), ("onnxruntime int8", INT8)):
        files = OnnxFiles.in_folder(folder, variant)
        reports[label] = measure_onnx_speed(OnnxSam.load(files.encoder), 1, WARMUP, REPEATS)
    return reports


def run(quick: bool) -> Section:
    model_type, image_size = QUICK if quick else FULL
    with tempfile.TemporaryDirectory(prefix="samkd-export-") as folder:
        parity = export_pair(model_type, image_size, Path(folder))
        speeds = latencies(model_type, image_size, Path(folder))
    baseline = speeds["PyTorch fp32"]
    table = ResultTable(
        [
            "runtime",
            "encoder latency (s)",
            "vs PyTorch",
            "decoder latency / box (ms)",
            "vs PyTorch",
            "embedding max |diff|",
            "mask logits max |diff|",
        ]
    )
    differences = {
        f"onnxruntime {precision}": report for precision, report in parity["parity"].items()
    }
    for label, speed in speeds.items():
        encoder = speed.encoder_latency.median_s
        decoder = speed.decoder_latency_per_prompt.median_s
        report = differences.get(label)
        table.add(
            label,
            f"{encoder:.3f}",
            f"{baseline.encoder_latency.median_s / encoder:.2f}x",
            f"{decoder * 1e3:.2f}",
            f"{baseline.decoder_latency_per_prompt.median_s / decoder:.2f}x",
            "" if report is None else f"{report['embedding_max_abs_diff']:.1e}",
            "" if report is None else f"{report['mask_logits_max_abs_diff']:.1e}",
        )
    return Section(
        NAME,
        "ONNX export: onnxruntime vs PyTorch on the CPU",
        (
            f"`samkd export` of `{model_type}` at {image_size} px (random weights, "
            f"`--quantize int8`), then the median latency of {REPEATS} calls after {WARMUP} "
            "warm-up calls, batch 1: the image encoder, and the decoder for one box prompt "
            "(PyTorch: prompt encoder and mask decoder; ONNX: the exported decoder, which "
            "also upscales the masks to the image size). Speed-ups are to PyTorch fp32 in "
            "the same run; differences are the parity check's on 2 generated images."
        ),
        [table],
        [f"{torch.get_num_threads()} torch threads; onnxruntime's default threads.", NOISE_NOTE],
    )
