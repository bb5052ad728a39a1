"""LoRA vs full fine-tuning: step time on the presets, trainable parameters on presets and
real sizes.

`run_train` with SAM's task loss only (no teachers, so the step is the student's alone) on a
generated dataset, for each preset in three modes: full fine-tuning, LoRA rank 4 on the
attention projections of image encoder and mask decoder (`student.lora` defaults), and LoRA
rank 4 on attention and MLPs with the mask decoder trained in full. The modes alternate over
rounds; each reports its median step (first steps dropped as warm-up). Trainable parameters are
counted on the student as training builds it.

    python -m benchmarks --only lora
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.common import NOISE_NOTE, ResultTable, Section, median, ratio
from benchmarks.train_step import train_step_seconds
from samkd.demo.shapes import write_shapes_dataset
from samkd.settings import load_settings
from samkd.train import setup

NAME = "lora"
MODES = {
    "full fine-tuning": [],
    "LoRA r4, attention": ["student.lora.rank=4"],
    "LoRA r4, attention + MLP, decoder in full": [
        "student.lora.rank=4",
        "student.lora.layers=[attention, mlp]",
        "student.lora.train_parts=[mask_decoder]",
    ],
}


@dataclass(frozen=True)
class Config:
    presets: tuple[str, ...]  # timed
    counted: tuple[str, ...]  # trainable parameters only
    image_size: int
    num_images: int
    batch_size: int
    steps: int
    warmup_steps: int
    rounds: int


FULL = Config(("vit_t_mini", "vit_mini"), ("vit_t", "vit_b"), 256, 8, 2, 8, 2, 2)
QUICK = Config(("vit_t_mini",), (), 128, 2, 1, 2, 1, 1)


def assignments(config: Config, data: Path, model_type: str) -> list[str]:
    return [
        f"data.train={data}",
        f"data.image_size={config.image_size}",
        "data.num_workers=0",
        f"student.model_type={model_type}",
        f"train.batch_size={config.batch_size}",
        "train.warmup_steps=0",
        "train.device=cpu",
        "logging.log_every=1",
        "logging.tensorboard=false",
    ]


def trainable_parameters(model_type: str, image_size: int, extra: list[str]) -> tuple[int, int]:
    """Trainable and all parameters of the student `samkd train` builds."""
    settings = load_settings(
        None, [f"student.model_type={model_type}", f"data.image_size={image_size}", *extra], {}
    )
    student = setup.build_student(settings, torch.device("cpu"))
    trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in student.parameters())


def run(quick: bool = False) -> Section:
    config = QUICK if quick else FULL
    workdir = Path(tempfile.mkdtemp(prefix="samkd-bench-lora-"))
    steps: dict[tuple[str, str], list[float]] = {}
    try:
        shape = (192, 256) if config.image_size >= 256 else (96, 128)
        data = write_shapes_dataset(workdir / "data", config.num_images, shape, seed=0)
        for round_index in range(config.rounds):
            for preset in config.presets:
                for index, (mode, extra) in enumerate(MODES.items()):
                    run_dir = workdir / f"run-{round_index}-{preset}-{index}"
                    steps.setdefault((preset, mode), [])
                    steps[(preset, mode)] += train_step_seconds(
                        [*assignments(config, data, preset), *extra],
                        config.steps,
                        config.warmup_steps,
                        config.batch_size,
                        run_dir,
                    )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    step_s = {key: median(values) for key, values in steps.items()}
    return section(config, step_s)


def section(config: Config, step_s: dict[tuple[str, str], float]) -> Section:
    table = ResultTable(
        ["model", "mode", "median step (s)", "ratio to full", "trainable", "share trainable"]
    )
    for preset in (*config.presets, *config.counted):
        for mode, extra in MODES.items():
            trainable, total = trainable_parameters(preset, config.image_size, extra)
            seconds = step_s.get((preset, mode))
            full = step_s.get((preset, "full fine-tuning"))
            timing = (
                ("-", "-")
                if seconds is None or full is None
                else (f"{seconds:.3f}", ratio(seconds, full))
            )
            table.add(preset, mode, *timing, f"{trainable:,}", f"{trainable / total:.2%}")
    return Section(
        name=NAME,
        title="LoRA vs full fine-tuning",
        description=(
            f"`run_train` with SAM's task loss only at {config.image_size} px, batch "
            f"{config.batch_size}, float32 on the CPU, generated shapes; {config.steps} steps a "
            f"run, the first {config.warmup_steps} dropped, {config.rounds} alternating rounds. "
            "Trainable parameters as `samkd train` builds the student (the ImageNet head and "
            "mask-prompt encoder are frozen in every mode); rows without a time are counted "
            "only (real sizes)."
        ),
        tables=[table],
        notes=[
            "A LoRA step still runs every layer forward and backpropagates through the "
            "activations to the earliest adapter; it saves the frozen weights' gradients, "
            "their AdamW update and its state (two floats per weight). The presets keep SAM's "
            "full-size mask decoder (4.1M parameters), so training it in full dominates their "
            "counts.",
            NOISE_NOTE,
        ],
    )
