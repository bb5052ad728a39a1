"""The end-to-end demo: generated data, a teacher trained on the spot, distillation, evaluation.

Every step is a real `samkd` command run as a subprocess, printed before it runs, reading
settings files written into the work folder, so the output can be copied and rerun by hand.

1. generate train and test shapes datasets (kept between runs);
2. train the teacher (`vit_mini`, no teachers: plain supervised training), cached by a hash
   of its settings and data;
3. `samkd extract` the teacher's image embeddings of the training set;
4. train the student (`vit_t_mini`) without distillation (lambda_kd = 0);
5. train the same student with distillation from the feature file;
6. `samkd eval` all three on the held-out test images;
7. print the table and write `summary.json`.

Both students start from the same random encoder and inherit the teacher's prompt encoder
and mask decoder, which stay frozen (MobileSAM's recipe); they see the same data in the same
order for the same steps. The only difference between them is the distillation loss.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.rule import Rule
from rich.table import Table

import samkd
from samkd.demo.shapes import write_shapes_dataset

TEACHER_TYPE = "vit_mini"
STUDENT_TYPE = "vit_t_mini"
TEACHER_NAME = "teacher"
DATA_MARKER = "demo-data.json"
TEACHER_MARKER = "demo-key.txt"
SUMMARY_FILE = "summary.json"
PACKAGE = Path(samkd.__file__).parent
# What trains a model, relative to the package: a cached teacher is retrained when it changes.
TRAINING_CODE = ("data", "distill", "models", "train", "runtime.py", "settings.py")
# The embedding MSE starts near 1e-2 against a task loss near 1: this weight puts the two on
# the same scale, so the teacher's signal is not lost in the task loss.
ENCODER_MSE_WEIGHT = 50.0


@dataclass(frozen=True)
class DemoSize:
    """How big the demo is: data, image size, steps. The full size is tuned for 2 CPU cores."""

    train_images: int
    test_images: int
    image_size: int
    batch_size: int
    teacher_steps: int
    teacher_lr: float
    student_steps: int
    student_lr: float
    log_every: int
    num_workers: int


FULL = DemoSize(
    train_images=400,
    test_images=100,
    image_size=128,
    batch_size=8,
    teacher_steps=600,
    teacher_lr=1e-3,
    student_steps=100,
    student_lr=1e-3,
    log_every=10,
    num_workers=1,
)

# Seconds rather than minutes: enough to run every command and produce every file.
FAST = DemoSize(
    train_images=8,
    test_images=3,
    image_size=64,
    batch_size=2,
    teacher_steps=2,
    teacher_lr=1e-3,
    student_steps=2,
    student_lr=1e-3,
    log_every=1,
    num_workers=0,
)


@dataclass(frozen=True)
class Paths:
    """Everything the demo writes, under one work folder."""

    root: Path

    @property
    def data(self) -> Path:
        return self.root / "data"

    def split(self, name: str) -> Path:
        return self.data / name

    @property
    def teacher_config(self) -> Path:
        return self.root / "teacher.yaml"

    @property
    def student_config(self) -> Path:
        return self.root / "student.yaml"

    @property
    def teacher_run(self) -> Path:
        return self.root / "teacher"

    @property
    def teacher_weights(self) -> Path:
        return self.teacher_run / "student.pt"

    @property
    def features(self) -> Path:
        return self.root / "features.h5"

    @property
    def baseline_run(self) -> Path:
        return self.root / "student-no-kd"

    @property
    def distilled_run(self) -> Path:
        return self.root / "student-kd"

    def eval_json(self, name: str) -> Path:
        return self.root / "eval" / f"{name}.json"


# --------------------------------------------------------------------------- settings files


def common_settings(paths: Paths, size: DemoSize) -> dict[str, Any]:
    """Data, logging and evaluation settings shared by the teacher and the students."""
    return {
        "data": {
            "train": str(paths.split("train")),
            "image_size": size.image_size,
            "num_workers": size.num_workers,
        },
        "logging": {"log_every": size.log_every, "tensorboard": False},
        # Box prompts with SAM's single-mask output, the output training fits for boxes.
        "eval": {"prompts": ["box"], "multimask": False, "speed": False},
    }


def teacher_settings(paths: Paths, size: DemoSize) -> dict[str, Any]:
    """Supervised training of the teacher from scratch: no teachers, SAM's task loss only."""
    settings = common_settings(paths, size)
    settings["student"] = {"model_type": TEACHER_TYPE}
    settings["train"] = {
        "steps": size.teacher_steps,
        "batch_size": size.batch_size,
        "lr": size.teacher_lr,
        "warmup_steps": max(1, size.teacher_steps // 20),
        "checkpoint_every": size.teacher_steps,
    }
    return settings


def student_settings(paths: Paths, size: DemoSize) -> dict[str, Any]:
    """The student, with the teacher's decoder, frozen; encoder matching by MSE."""
    settings = common_settings(paths, size)
    settings["teachers"] = [
        {"name": TEACHER_NAME, "model_type": TEACHER_TYPE, "checkpoint": str(paths.teacher_weights)}
    ]
    settings["student"] = {
        "model_type": STUDENT_TYPE,
        "decoder_from": TEACHER_NAME,
    }
    settings["distillation"] = {"encoder": {"enabled": True, "mse_weight": ENCODER_MSE_WEIGHT}}
    settings["extract"] = {"output": str(paths.features), "taps": ["encoder.embed"]}
    settings["train"] = {
        "steps": size.student_steps,
        "batch_size": size.batch_size,
        "lr": size.student_lr,
        "warmup_steps": max(1, size.student_steps // 20),
        "checkpoint_every": size.student_steps,
        "frozen_until": {"prompt_encoder": -1, "mask_decoder": -1},
    }
    return settings


def write_yaml(settings: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(settings, sort_keys=False))


# --------------------------------------------------------------------------- commands


def samkd_command(*arguments: str | Path) -> list[str]:
    """`python -m samkd ...` with this interpreter, so the demo runs what it prints."""
    return [sys.executable, "-m", "samkd", *(str(argument) for argument in arguments)]


def shown_command(command: list[str]) -> str:
    """The command as a user would type it (`samkd ...` instead of the interpreter path)."""
    return shlex.join(["samkd", *command[3:]])


def command_environment() -> dict[str, str]:
    """The demo's environment, with one thread per command unless OMP_NUM_THREADS says
    otherwise: on two shared cores, two threads per process that wait on each other make a
    run several times slower, while at these sizes a second thread gains little."""
    return {"OMP_NUM_THREADS": "1", **os.environ}


def run_command(command: list[str], console: Console, commands: list[str]) -> None:
    """Print, record and run one command; its output (progress bars included) goes straight
    to this terminal."""
    text = shown_command(command)
    commands.append(text)
    console.print(f"[bold green]$[/] {text}", highlight=False, soft_wrap=True)
    completed = subprocess.run(command, check=False, env=command_environment())
    if completed.returncode != 0:
        raise RuntimeError(f"demo step failed (exit {completed.returncode}): {text}")


def remove(path: Path) -> None:
    """Delete a previous output so the command starts afresh."""
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


# --------------------------------------------------------------------------- steps


def make_datasets(paths: Paths, size: DemoSize, console: Console) -> None:
    """Train and test splits from different seeds; regenerated when the size changes."""
    spec = {
        "train": size.train_images,
        "test": size.test_images,
        "seeds": [0, 1],
    }
    marker = paths.data / DATA_MARKER
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        console.print(f"datasets in {paths.data} already exist (cached)")
        return
    remove(paths.data)
    for seed, split in enumerate(("train", "test")):
        count = spec[split]
        assert isinstance(count, int)
        console.print(f"writing {count} {split} images to {paths.split(split)}")
        write_shapes_dataset(paths.split(split), count, seed=seed)
    marker.write_text(json.dumps(spec))


def training_code_digest(package: Path = PACKAGE) -> str:
    """sha256 of samkd's version and of the source of the code that trains a model
    (`TRAINING_CODE` under `package`)."""
    digest = hashlib.sha256(samkd.__version__.encode())
    for part in TRAINING_CODE:
        path = package / part
        for source in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            digest.update(source.relative_to(package).as_posix().encode())
            digest.update(source.read_bytes())
    return digest.hexdigest()


def teacher_key(paths: Paths) -> str:
    """Changes whenever the teacher's settings, its training data or the code that trains it
    change, so a cached teacher is always one that this code would train."""
    digest = hashlib.sha256(paths.teacher_config.read_bytes())
    digest.update((paths.data / DATA_MARKER).read_bytes())
    digest.update(training_code_digest().encode())
    return digest.hexdigest()[:16]


def train_teacher(paths: Paths, console: Console, commands: list[str]) -> bool:
    """Train the teacher unless a finished run with the same key exists; True if trained."""
    command = samkd_command(
        "train", "--config", paths.teacher_config, "--output-dir", paths.teacher_run
    )
    marker = paths.teacher_run / TEACHER_MARKER
    key = teacher_key(paths)
    if paths.teacher_weights.is_file() and marker.is_file() and marker.read_text() == key:
        text = shown_command(command)
        commands.append(text)
        console.print(f"[bold green]$[/] {text}  [dim](cached: {paths.teacher_weights})[/]")
        return False
    remove(paths.teacher_run)
    run_command(command, console, commands)
    marker.write_text(key)
    return True


def extract_features(paths: Paths, console: Console, commands: list[str]) -> None:
    remove(paths.features)
    remove(paths.features.with_name(paths.features.name + ".parts"))
    run_command(samkd_command("extract", "--config", paths.student_config), console, commands)


def train_students(paths: Paths, console: Console, commands: list[str]) -> None:
    """The same run twice; the baseline sets lambda_kd to 0, which switches every
    distillation term off but keeps the teacher's decoder as the starting point."""
    remove(paths.baseline_run)
    remove(paths.distilled_run)
    base: list[str | Path] = ["train", "--config", paths.student_config]
    base += ["--features", paths.features]
    baseline = [*base, "--output-dir", paths.baseline_run]
    baseline += ["--set", "distillation.dynamic_lambda.initial=0"]
    run_command(samkd_command(*baseline), console, commands)
    distilled = [*base, "--output-dir", paths.distilled_run]
    run_command(samkd_command(*distilled), console, commands)


def evaluate_models(paths: Paths, console: Console, commands: list[str]) -> None:
    models = {
        "teacher": (TEACHER_TYPE, paths.teacher_weights),
        "student-no-kd": (STUDENT_TYPE, paths.baseline_run / "student.pt"),
        "student-kd": (STUDENT_TYPE, paths.distilled_run / "student.pt"),
    }
    for name, (model_type, weights) in models.items():
        json_path = paths.eval_json(name)
        remove(json_path)
        command = samkd_command(
            "eval",
            "--config",
            paths.student_config,
            "--model-type",
            model_type,
            "--checkpoint",
            weights,
            "--data",
            paths.split("test"),
            "--json",
            json_path,
        )
        run_command(command, console, commands)


# --------------------------------------------------------------------------- results


def box_miou(report_path: Path) -> float:
    """Box-prompted mIoU (single-mask output) over every object of a report."""
    report = json.loads(report_path.read_text())
    return float(report["quality"]["box"]["single"]["miou"])


def verdict_of(teacher: float, baseline: float, distilled: float) -> tuple[bool, str]:
    gain = distilled - baseline
    if gain <= 0:
        return False, (
            f"distillation did NOT help on this run: the distilled student is {-gain:.4f} mIoU "
            "below the student trained without it"
        )
    text = f"distillation helped: +{gain:.4f} mIoU over the same student trained without it"
    gap = teacher - baseline
    if gap > 0:
        text += f" ({100 * gain / gap:.0f}% of the teacher-student gap)"
    return True, text


def results_table(miou: dict[str, float], gain: float) -> Table:
    table = Table(title="box-prompted mIoU on the held-out test images", title_justify="left")
    table.add_column("model")
    table.add_column("type")
    table.add_column("mIoU", justify="right")
    table.add_column("vs student w/o KD", justify="right")
    table.add_row("teacher", TEACHER_TYPE, f"{miou['teacher']:.4f}", "")
    table.add_row("student without distillation", STUDENT_TYPE, f"{miou['student-no-kd']:.4f}", "")
    table.add_row(
        "student with distillation",
        STUDENT_TYPE,
        f"{miou['student-kd']:.4f}",
        f"[{'green' if gain > 0 else 'red'}]{gain:+.4f}[/]",
    )
    return table


def summarize(
    paths: Paths, size: DemoSize, commands: list[str], timings: dict[str, float], cached: bool
) -> dict[str, Any]:
    miou = {
        name: box_miou(paths.eval_json(name)) for name in ("teacher", "student-no-kd", "student-kd")
    }
    gain = miou["student-kd"] - miou["student-no-kd"]
    helped, verdict = verdict_of(miou["teacher"], miou["student-no-kd"], miou["student-kd"])
    return {
        "miou": miou,
        "gain": gain,
        "distillation_helped": helped,
        "teacher_beats_student": miou["teacher"] > miou["student-no-kd"],
        "verdict": verdict,
        "teacher_cached": cached,
        "size": asdict(size),
        "commands": commands,
        "seconds": timings,
        "metric": "box prompt, single-mask output, mIoU over all test objects",
    }


def step_durations(starts: list[tuple[str, float]], end: float) -> dict[str, float]:
    """Seconds spent in each step, and in total."""
    ends = [start for _, start in starts[1:]] + [end]
    pairs = zip(starts, ends, strict=True)
    durations = {title: round(stop - start, 1) for (title, start), stop in pairs}
    durations["total"] = round(end - starts[0][1], 1)
    return durations


# --------------------------------------------------------------------------- the demo


def run_demo(
    workdir: Path | str = ".samkd-demo", fast: bool = False, console: Console | None = None
) -> dict[str, Any]:
    """Run the whole demo in `workdir`; returns (and writes) the summary.

    `fast`: a tiny version (a few images and steps) that checks the pipeline, not the numbers.
    """
    console = console or Console()
    size = FAST if fast else FULL
    paths = Paths(Path(workdir))
    paths.root.mkdir(parents=True, exist_ok=True)
    commands: list[str] = []
    starts: list[tuple[str, float]] = []

    def step(title: str) -> None:
        starts.append((title, time.perf_counter()))
        elapsed = starts[-1][1] - starts[0][1]
        console.print(Rule(f"[bold]{title}[/]  [dim]{elapsed:.0f} s[/]"))

    console.print(
        f"[bold]samkd demo[/] in {paths.root}: a {TEACHER_TYPE} teacher, a {STUDENT_TYPE} "
        f"student, {size.image_size} px shapes. Every step is a samkd command you can rerun "
        f"(here with OMP_NUM_THREADS={command_environment()['OMP_NUM_THREADS']})."
    )
    step("1/7 datasets")
    make_datasets(paths, size, console)
    write_yaml(teacher_settings(paths, size), paths.teacher_config)
    write_yaml(student_settings(paths, size), paths.student_config)
    console.print(f"settings files: {paths.teacher_config}, {paths.student_config}")
    step("2/7 teacher: supervised training of vit_mini (cached after the first run)")
    trained = train_teacher(paths, console, commands)
    step("3/7 teacher features of the training set")
    extract_features(paths, console, commands)
    step("4-5/7 student without, then with distillation")
    console.print(
        "Both students start from the same random encoder and the teacher's prompt encoder "
        "and mask decoder (frozen), and see the same batches for the same steps; the only "
        "difference is lambda_kd: 0 for the first, 1 for the second."
    )
    train_students(paths, console, commands)
    step("6/7 evaluation on the held-out test images")
    evaluate_models(paths, console, commands)
    step("7/7 results")
    timings = step_durations(starts, time.perf_counter())
    summary = summarize(paths, size, commands, timings, cached=not trained)
    (paths.root / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    console.print(results_table(summary["miou"], summary["gain"]))
    colour = "green" if summary["distillation_helped"] else "red"
    console.print(f"[bold {colour}]{summary['verdict']}[/]")
    if not summary["teacher_beats_student"]:
        console.print("[bold red]the teacher is not better than the undistilled student[/]")
    console.print(f"total {timings['total']:.0f} s; summary in {paths.root / SUMMARY_FILE}")
    return summary
