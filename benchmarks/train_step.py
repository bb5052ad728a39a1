"""Training step time: plain fine-tuning vs distillation from stored vs online teacher features.

Three `run_train` runs on the same generated dataset, student and settings: (a) no teachers
(SAM's task loss only), (b) the default distillation objective (encoder MSE on
`encoder.embed`) with teacher features read from an HDF5 file written by `run_extract`,
(c) the same objective with the teacher run online, then (b) plus the decoder terms with
one-shot prompts and with a 3-iteration prompt loop (`train.prompt_iters`). Step time is read
from `metrics.jsonl`
(`images_per_s`, logged every step), dropping the first steps as warm-up; the modes alternate
over rounds and each reports the median step. Target: (b)/(a) <= 1.10.

One precomputed run is also profiled with cProfile (from the first step after warm-up to the
final checkpoint) to show where a step's time goes.

    python -m benchmarks --only train_step
"""

from __future__ import annotations

import cProfile
import pstats
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

from rich.console import Console

import samkd.train.loop
import samkd.train.step
from benchmarks.common import NOISE_NOTE, ResultTable, Section, median, ratio
from samkd.demo.shapes import write_shapes_dataset
from samkd.extract import run_extract
from samkd.settings import load_settings
from samkd.train import run_train
from samkd.train.metrics_log import read_metrics

NAME = "train_step"
TARGET = 1.10
STUDENT = "vit_t_mini"
TEACHER = "vit_mini"
TEACHERS = f"teachers=[{{name: teacher, model_type: {TEACHER}}}]"
DECODER = "+ decoder terms, precomputed, prompt_iters 1"
LOOPED = "+ decoder terms, precomputed, prompt_iters 3"
DECODER_TERMS = ["distillation.decoder.enabled=true"]
LOOP = ["train.prompt_iters=3"]


@dataclass(frozen=True)
class Config:
    image_size: int
    num_images: int
    batch_size: int
    steps: int
    warmup_steps: int  # dropped from the timing
    rounds: int
    profile_steps: int


FULL = Config(
    image_size=256, num_images=16, batch_size=2, steps=8, warmup_steps=2, rounds=2, profile_steps=6
)
QUICK = Config(
    image_size=128, num_images=4, batch_size=1, steps=2, warmup_steps=1, rounds=1, profile_steps=2
)

# Functions of one training step, each run once per step (nested ones marked with "of which").
PHASES = (
    ("data loading (decode, prompts, HDF5 read)", "torch/utils/data/dataloader.py", "__next__"),
    ("  of which HDF5 feature read", "samkd/features/reader.py", "read"),
    ("teacher features (stack stored rows)", "samkd/train/teachers.py", "teacher_features"),
    ("student forward + losses", "samkd/train/step.py", "forward"),
    ("  of which distillation objective", "samkd/distill/objective.py", "forward"),
    ("backward", "torch/_tensor.py", "backward"),
    ("optimizer step (clip + AdamW)", "samkd/train/step.py", "optimizer_step"),
)


def common_assignments(config: Config, data: Path) -> list[str]:
    return [
        f"data.train={data}",
        f"data.image_size={config.image_size}",
        # No workers: data loading then shows up in the step time instead of overlapping it,
        # an upper bound on what reading stored features costs.
        "data.num_workers=0",
        f"student.model_type={STUDENT}",
        f"train.batch_size={config.batch_size}",
        "train.warmup_steps=0",
        "train.device=cpu",
        "logging.log_every=1",
        "logging.tensorboard=false",
    ]


def mode_assignments(features: Path) -> dict[str, list[str]]:
    return {
        "plain fine-tuning (no teacher)": [],
        "distillation, precomputed features": [TEACHERS, f"distillation.features={features}"],
        "distillation, online teacher": [TEACHERS, "distillation.use_precomputed_features=false"],
        DECODER: [TEACHERS, f"distillation.features={features}", *DECODER_TERMS],
        LOOPED: [TEACHERS, f"distillation.features={features}", *DECODER_TERMS, *LOOP],
    }


def train_step_seconds(
    assignments: list[str], steps: int, warmup_steps: int, batch_size: int, run_dir: Path
) -> list[float]:
    """Seconds of each step after the warm-up ones, from the run's metrics.jsonl.

    `assignments` must log every step (`logging.log_every=1`).
    """
    settings = load_settings(
        None, [*assignments, f"train.steps={steps}", f"train.output_dir={run_dir}"], environ={}
    )
    run_train(settings, console=Console(quiet=True))
    records = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"]
    return [batch_size / r["images_per_s"] for r in records[warmup_steps:]]


def extract_features(config: Config, data: Path, output: Path) -> None:
    settings = load_settings(
        None,
        [
            f"data.train={data}",
            f"data.image_size={config.image_size}",
            TEACHERS,
            f"extract.output={output}",
            "extract.device=cpu",
        ],
        environ={},
    )
    run_extract(settings, console=Console(quiet=True))


@contextmanager
def profiling_steps(warmup_steps: int, profiler: cProfile.Profile) -> Iterator[None]:
    """Profile from the first micro-step after the warm-up ones to the final checkpoint."""
    micro_step: Callable[..., Any] = samkd.train.step.micro_step
    save_checkpoint: Callable[..., Any] = samkd.train.loop.save_checkpoint
    calls = 0

    def counted_micro_step(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == warmup_steps + 1:
            profiler.enable()
        return micro_step(*args, **kwargs)

    def unprofiled_save(*args: Any, **kwargs: Any) -> Any:
        profiler.disable()
        return save_checkpoint(*args, **kwargs)

    with (
        mock.patch.object(samkd.train.step, "micro_step", counted_micro_step),
        mock.patch.object(samkd.train.loop, "save_checkpoint", unprofiled_save),
    ):
        try:
            yield
        finally:
            profiler.disable()


def profile_precomputed(config: Config, assignments: list[str], run_dir: Path) -> pstats.Stats:
    settings = load_settings(
        None,
        [*assignments, f"train.steps={config.profile_steps}", f"train.output_dir={run_dir}"],
        environ={},
    )
    profiler = cProfile.Profile()
    with profiling_steps(config.warmup_steps, profiler):
        run_train(settings, console=Console(quiet=True))
    return pstats.Stats(profiler)


def phase_table(stats: pstats.Stats) -> ResultTable:
    table = ResultTable(["phase", "calls", "ms per call", "share"], title="Where a step goes")
    entries: dict[tuple[str, int, str], Any] = stats.stats  # type: ignore[attr-defined]
    found = []
    for label, path_end, function in PHASES:
        matches = [
            (calls, cumulative)
            for (path, _, name), (_, calls, _, cumulative, _) in entries.items()
            if path.replace("\\", "/").endswith(path_end) and name == function
        ]
        calls = sum(c for c, _ in matches)
        cumulative = sum(t for _, t in matches)
        found.append((label, calls, cumulative))
    top_level = sum(t for label, _, t in found if not label.startswith(" "))
    for label, calls, cumulative in found:
        per_call = 1e3 * cumulative / calls if calls else 0.0
        share = f"{cumulative / top_level:.0%}" if top_level else "-"
        table.add(label.replace("  ", "- "), calls, f"{per_call:.1f}", share)
    return table


def top_functions_table(stats: pstats.Stats, count: int = 10) -> ResultTable:
    table = ResultTable(["function (self time)", "calls", "self s", "share"], title="Top costs")
    entries: dict[tuple[str, int, str], Any] = stats.stats  # type: ignore[attr-defined]
    total = sum(own for (_, _, own, _, _) in entries.values())
    ranked = sorted(entries.items(), key=lambda item: item[1][2], reverse=True)[:count]
    for (path, line, name), (_, calls, own, _, _) in ranked:
        where = name if path == "~" else f"{'/'.join(Path(path).parts[-2:])}:{line} {name}"
        table.add(f"`{where}`", calls, f"{own:.2f}", f"{own / total:.0%}")
    return table


def run(quick: bool = False) -> Section:
    config = QUICK if quick else FULL
    workdir = Path(tempfile.mkdtemp(prefix="samkd-bench-train-"))
    try:
        shape = (192, 256) if config.image_size >= 256 else (96, 128)
        data = write_shapes_dataset(workdir / "data", config.num_images, shape, seed=0)
        features = workdir / "features.h5"
        extract_features(config, data, features)
        common = common_assignments(config, data)
        modes = mode_assignments(features)
        steps: dict[str, list[float]] = {mode: [] for mode in modes}
        for round_index in range(config.rounds):
            for index, (mode, extra) in enumerate(modes.items()):
                run_dir = workdir / f"run-{round_index}-{index}"
                steps[mode] += train_step_seconds(
                    [*common, *extra], config.steps, config.warmup_steps, config.batch_size, run_dir
                )
        precomputed = [*common, *modes["distillation, precomputed features"]]
        stats = profile_precomputed(config, precomputed, workdir / "profiled")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return section(config, {mode: median(times) for mode, times in steps.items()}, stats)


def section(config: Config, step_s: dict[str, float], stats: pstats.Stats) -> Section:
    table = ResultTable(["mode", "median step (s)", "images/s", "ratio to plain"])
    baseline = next(iter(step_s.values()))
    for mode, seconds in step_s.items():
        table.add(
            mode, f"{seconds:.3f}", f"{config.batch_size / seconds:.2f}", ratio(seconds, baseline)
        )
    precomputed = step_s["distillation, precomputed features"] / baseline
    measured = (config.steps - config.warmup_steps) * config.rounds
    online = step_s["distillation, online teacher"] / baseline
    looped = step_s[LOOPED] / step_s[DECODER]
    noise = (
        [
            "The online teacher timed faster than stored features, which cannot be real (it "
            "adds a teacher forward to the same step): the load on the machine changed "
            "between runs, i.e. the size of the noise here."
        ]
        if online < precomputed
        else []
    )
    return Section(
        name=NAME,
        title="Training step: plain vs precomputed vs online distillation, prompt loop",
        description=(
            f"`run_train` with student `{STUDENT}` and random-weight teacher `{TEACHER}` at "
            f"{config.image_size} px, batch {config.batch_size}, float32 on the CPU, generated "
            "dataset with masks (so every mode also computes SAM's task loss), default "
            "objective (encoder MSE on `encoder.embed`; the last two rows add the decoder "
            "terms, the stored teacher decoder run on the stored embedding, with one-shot "
            "prompts or a 3-iteration prompt loop), no DataLoader workers (data loading, "
            "HDF5 reads included, is inside the step time). Median of "
            f"{measured} steps per mode ({config.rounds} alternating rounds of "
            f"{config.steps} steps, the first {config.warmup_steps} of each dropped). "
            f"Target: precomputed / plain <= {TARGET:.2f}."
        ),
        tables=[table, phase_table(stats), top_functions_table(stats)],
        notes=[
            f"precomputed / plain = {precomputed:.2f} "
            f"({'meets' if precomputed <= TARGET else 'misses'} the {TARGET:.2f} target).",
            f"prompt_iters 3 / 1 (decoder terms on) = {looped:.2f}: the student's and the "
            "stored teacher's decoders run three times, with the click sampling (distance "
            "transforms) between; the image encoder, the larger cost, runs once.",
            f"Profile: cProfile over the last {config.profile_steps - config.warmup_steps} "
            f"steps of a {config.profile_steps}-step precomputed run (the data loading of "
            "the first profiled step falls before the window); phase shares are of their "
            "sum, top-function shares of all profiled self time.",
            "Real-size `vit_t` at 1024 px with a ViT-H teacher runs in `benchmarks/gpu_check.sh`;"
            " on this CPU a ViT-B forward alone at 1024 px takes tens of seconds.",
            *noise,
            NOISE_NOTE,
        ],
    )
