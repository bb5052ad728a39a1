"""What `samkd eval` and `samkd export` run on: a model to build and the evaluation dataset.

Weights that a training run wrote (its checkpoints, `checkpoints/best.pt` and `last.pt`, which
hold the run's settings, and its `student.pt`, beside the run's `settings.yaml`) are built as
the run trained them: its model type and input size, whatever the defaults say.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import ValidationError
from segment_anything.modeling import Sam

from samkd.data import SegmentationDataset, build_dataset
from samkd.errors import UsageError
from samkd.models import build_sam
from samkd.models.checkpoint import is_training_checkpoint
from samkd.runtime import input_image_size
from samkd.settings import Settings, TeacherSettings, load_settings

# A training run's folder: its settings, and the student it exports when it finishes.
RUN_SETTINGS = "settings.yaml"
RUN_WEIGHTS = "student.pt"


@dataclass(frozen=True)
class ModelSpec:
    """What to build: a registry type, optional weights, and the input size."""

    label: str
    model_type: str
    checkpoint: Path | None
    image_size: int

    def build(self, device: torch.device) -> Sam:
        model = build_sam(self.model_type, image_size=self.image_size, checkpoint=self.checkpoint)
        return model.to(device).eval()

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "model_type": self.model_type,
            "checkpoint": None if self.checkpoint is None else str(self.checkpoint),
            "image_size": self.image_size,
        }


def student_spec(settings: Settings, checkpoint: Path | None = None) -> ModelSpec:
    """The student of `checkpoint` (default `student.checkpoint`; random weights without
    either): of the model type and input size of the run that trained it (see the module
    docstring), else of the settings. A model type or image size set explicitly that
    contradicts the run's is a one-line `UsageError`."""
    checkpoint = checkpoint or settings.student.checkpoint
    run = None if checkpoint is None else trained_settings(checkpoint)
    if run is None:
        model_type = settings.student.model_type
        return ModelSpec("student", model_type, checkpoint, input_image_size(settings))
    assert checkpoint is not None
    model_type, image_size = run.student.model_type, input_image_size(run)
    trained = f"{checkpoint}: trained as {model_type} at {image_size} px"
    given = settings.student
    if "model_type" in given.model_fields_set and given.model_type != model_type:
        raise UsageError(
            f"{trained}; student.model_type {given.model_type} contradicts it "
            "(leave out --model-type)"
        )
    size = settings.data.image_size
    if "image_size" in settings.data.model_fields_set and size not in (None, image_size):
        raise UsageError(f"{trained}; data.image_size {size} contradicts it (leave it out)")
    return ModelSpec("student", model_type, checkpoint, image_size)


def trained_settings(checkpoint: Path) -> Settings | None:
    """The settings of the run that wrote `checkpoint`: those a `samkd train` checkpoint
    holds, or for a run's `student.pt` its folder's; None for other weights (and for a
    file that does not load: building the model reports that)."""
    if checkpoint.name == RUN_WEIGHTS and (checkpoint.parent / RUN_SETTINGS).is_file():
        return load_settings(checkpoint.parent / RUN_SETTINGS, environ={})
    try:
        # Memory-mapped: the tensors are not read.
        loaded = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # any unreadable file: `build_sam` names the problem
        return None
    if not is_training_checkpoint(loaded):
        return None
    try:
        return Settings.model_validate(yaml.safe_load(loaded["settings"]))
    except (yaml.YAMLError, ValidationError) as error:
        reason = str(error).splitlines()[0]
        raise UsageError(f"{checkpoint}: the run settings it holds do not load: {reason}") from None


def teacher_spec(settings: Settings, teacher: str, image_size: int) -> ModelSpec:
    """The teacher named `teacher` in the settings, or a registry model type of that name."""
    for entry in settings.teachers:
        if entry.name == teacher:
            return ModelSpec(
                f"teacher {entry.name}", entry.model_type, entry.checkpoint, image_size
            )
    checked = TeacherSettings.model_validate({"name": teacher, "model_type": teacher})
    return ModelSpec(f"teacher {teacher}", checked.model_type, None, image_size)


def load_eval_dataset(settings: Settings, image_size: int) -> SegmentationDataset:
    """The dataset of `data.val` (else `data.train`) at input side `image_size`."""
    root = settings.data.val or settings.data.train
    if root is None:
        raise UsageError("no dataset to evaluate: pass --data FOLDER or set data.val")
    return build_dataset(
        root,
        layout=settings.data.layout,
        annotation_file=settings.data.annotation_file,
        image_size=image_size,
        on_error=settings.data.on_error,
        mask_threshold=settings.data.mask_threshold,
        seed=settings.eval.seed,
    )
