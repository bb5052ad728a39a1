"""What `samkd view SOURCE ... --teacher NAME` names, built into models.

A SOURCE is a training run folder (its `student.pt`, else its latest training checkpoint, with
the model type and image size of its `settings.yaml`), a checkpoint of `student.model_type`, or
a `samkd export` folder (or one of its `image_encoder*.onnx` files). `--teacher` is a teacher
named in a run folder's settings (or in `--config`'s), or a registry model type with
`--teacher-checkpoint` weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from samkd.errors import UsageError
from samkd.evaluate.onnx_session import ENCODER_FILE
from samkd.evaluate.predict import PromptableModel
from samkd.evaluate.spec import RUN_SETTINGS, RUN_WEIGHTS, ModelSpec, teacher_spec
from samkd.models import MODEL_TYPES, model_type_info
from samkd.runtime import input_image_size
from samkd.settings import Settings, load_settings

MAX_MODELS = 2
# A run that has not finished has no student.pt yet: its training checkpoints, best first.
RUN_CHECKPOINTS = ("checkpoints/best.pt", "checkpoints/last.pt")
ONNX = "onnx"


@dataclass(frozen=True)
class SourceSpec:
    """One model to load: a registry type with weights (`spec`), or an ONNX pair (`onnx`)."""

    label: str
    spec: ModelSpec | None = None
    onnx: Path | None = None

    def describe(self, short: bool = True) -> str:
        """The model type, its input size and its weights' path (`short`: the file and its
        folder, enough to tell runs apart in a table cell)."""
        path = self.onnx if self.spec is None else self.spec.checkpoint
        shown = "random weights" if path is None else str(path)
        if path is not None and short:
            shown = f"{path.parent.name}/{path.name}"
        if self.spec is None:
            return f"ONNX {shown}"
        return f"{self.spec.model_type} at {self.spec.image_size} px, {shown}"


@dataclass(frozen=True)
class LoadedModel:
    """A model ready to prompt: `model` is a `Sam` or an `OnnxSam`; `image_size` its input side
    (each model sees the image in its own frame)."""

    label: str
    description: str
    model_type: str
    image_size: int
    model: PromptableModel


def is_run_folder(path: Path) -> bool:
    return path.is_dir() and (path / RUN_SETTINGS).is_file()


def is_onnx_source(path: Path) -> bool:
    return (path.is_dir() and (path / ENCODER_FILE).is_file()) or path.suffix == ".onnx"


def run_settings(run: Path) -> Settings:
    """The settings a training run folder was run with."""
    return load_settings(run / RUN_SETTINGS, environ={})


def run_weights(run: Path) -> Path:
    """The student's weights of a run: `student.pt`, else its best or last training
    checkpoint (a run still training)."""
    for name in (RUN_WEIGHTS, *RUN_CHECKPOINTS):
        if (run / name).is_file():
            return run / name
    raise UsageError(
        f"{run}: no {RUN_WEIGHTS} or training checkpoint yet (to follow its curves: "
        f"samkd view --run {run})"
    )


def source_spec(source: Path, settings: Settings) -> SourceSpec:
    """What one SOURCE argument names (see the module docstring)."""
    if is_onnx_source(source):
        return SourceSpec(f"{_name(source)} ({ONNX})", onnx=source)
    if is_run_folder(source):
        run = run_settings(source)
        spec = ModelSpec(
            _name(source), run.student.model_type, run_weights(source), input_image_size(run)
        )
        return SourceSpec(spec.label, spec=spec)
    if source.is_file():
        model_type = settings.student.model_type
        spec = ModelSpec(source.stem, model_type, source, input_image_size(settings))
        return SourceSpec(spec.label, spec=spec)
    raise UsageError(
        f"{source}: not a training run folder, checkpoint or samkd export folder (.onnx)"
    )


def teacher_source(
    teacher: str, checkpoint: Path | None, sources: list[Path], settings: Settings
) -> SourceSpec:
    """`--teacher`: a teacher named in the settings of the first run folder among `sources`
    that names it (or of `--config`), at that run's image size; else a registry model type
    at `data.image_size` (default: the type's own size) with `checkpoint`'s weights."""
    for candidate in [run_settings(path) for path in sources if is_run_folder(path)] + [settings]:
        if any(entry.name == teacher for entry in candidate.teachers):
            spec = teacher_spec(candidate, teacher, input_image_size(candidate))
            if checkpoint is not None:
                spec = ModelSpec(spec.label, spec.model_type, checkpoint, spec.image_size)
            return SourceSpec(spec.label, spec=spec)
    try:
        info = model_type_info(teacher)
    except ValueError:
        raise UsageError(
            f"--teacher {teacher}: no teacher of that name in the run folders' or --config's "
            f"settings, and not a model type ({', '.join(MODEL_TYPES)})"
        ) from None
    image_size = settings.data.image_size or info.default_image_size
    spec = ModelSpec(f"teacher {teacher}", teacher, checkpoint, image_size)
    return SourceSpec(spec.label, spec=spec)


def model_sources(
    sources: list[Path], teacher: str | None, teacher_checkpoint: Path | None, settings: Settings
) -> list[SourceSpec]:
    """The models the page compares, in order, with labels made unique: none, one or two."""
    if teacher is None and teacher_checkpoint is not None:
        raise UsageError("--teacher-checkpoint needs --teacher NAME_OR_MODEL_TYPE")
    specs = [source_spec(path, settings) for path in sources]
    if teacher is not None:
        specs.append(teacher_source(teacher, teacher_checkpoint, sources, settings))
    if len(specs) > MAX_MODELS:
        raise UsageError(
            f"samkd view compares at most {MAX_MODELS} models, got {len(specs)} "
            "(SOURCE arguments and --teacher)"
        )
    return _unique_labels(specs)


def load_model(source: SourceSpec, device: torch.device) -> LoadedModel:
    """Build (or open, for ONNX) one model."""
    if source.onnx is not None:
        from samkd.evaluate.onnx_session import OnnxSam

        exported = OnnxSam.load(source.onnx)
        info = exported.info
        return LoadedModel(
            source.label, source.describe(), info.model_type, info.image_size, exported
        )
    assert source.spec is not None
    spec = source.spec
    model = spec.build(device)
    return LoadedModel(source.label, source.describe(), spec.model_type, spec.image_size, model)


def _name(path: Path) -> str:
    """A short label: the folder or file name (a run folder's own name, not `.`)."""
    return path.resolve().name or str(path)


def _unique_labels(specs: list[SourceSpec]) -> list[SourceSpec]:
    if len({spec.label for spec in specs}) == len(specs):
        return specs
    return [
        SourceSpec(f"{number}: {spec.label}", spec.spec, spec.onnx)
        for number, spec in enumerate(specs, start=1)
    ]
