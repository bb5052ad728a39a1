"""Mask quality of one model (and its agreement with a teacher) over a dataset."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from segment_anything.modeling import Sam

from samkd.evaluate.metrics import IoUTable, mask_iou
from samkd.evaluate.predict import ObjectPrompts, PromptableModel, encode_images, predict_masks
from samkd.evaluate.prompts import add_clicks, box_prompts, center_point_prompts

# Output modes: the single-mask output, and the best (against the ground truth) of the three
# multimask outputs, the "oracle" number reported for SAM.
OUTPUT_MODES = {"single": False, "best": True}


@dataclass(frozen=True)
class QualityOptions:
    """Which prompts and outputs to measure; `num_points` is k of `points-k`."""

    prompt_kinds: tuple[str, ...] = ("box", "point")
    num_points: int = 3
    multimask: bool = True

    def prompt_names(self) -> list[str]:
        return [
            f"points-{self.num_points}" if kind == "points" else kind for kind in self.prompt_kinds
        ]

    def output_modes(self) -> list[str]:
        return list(OUTPUT_MODES) if self.multimask else ["single"]


@dataclass
class QualityTables:
    """Per-object scores (IoU, Dice, boundary IoU; see `IoUTable`): the model against the
    ground truth, the teacher against the ground truth, and the model against the teacher
    for the same prompts."""

    model: IoUTable = field(default_factory=IoUTable)
    teacher: IoUTable = field(default_factory=IoUTable)
    agreement: IoUTable = field(default_factory=IoUTable)


@dataclass(frozen=True)
class Shown:
    """One model's single-output masks (`N x H x W` bool) for one prompt kind on one image,
    and the prompts they came from (original-image coordinates), for the overlays."""

    prompts: ObjectPrompts
    masks: torch.Tensor


ShownPrompts = dict[str, tuple[Shown, Shown | None]]
"""By prompt kind: the model's masks and prompts, and the teacher's (None without one)."""


def select_output(masks: torch.Tensor, targets: torch.Tensor, mode: str) -> torch.Tensor:
    """One mask per object: `N x M x H x W` predictions -> `N x H x W`."""
    if mode == "single":
        return masks[:, 0]
    ious = mask_iou(masks, targets[:, None])
    return masks[torch.arange(masks.shape[0]), ious.argmax(dim=1)]


def decode(
    model: PromptableModel,
    embedding: torch.Tensor,
    prompts: ObjectPrompts,
    targets: torch.Tensor,
    original_size: tuple[int, int],
    mode: str,
) -> torch.Tensor:
    """Masks `N x H x W` of `model` for `prompts` in output `mode`."""
    prediction = predict_masks(model, embedding, prompts, original_size, OUTPUT_MODES[mode])
    return select_output(prediction.masks, targets, mode)


def make_prompts(
    kind: str,
    model: PromptableModel,
    embedding: torch.Tensor,
    targets: torch.Tensor,
    original_size: tuple[int, int],
    mode: str,
) -> ObjectPrompts:
    """Prompts of `kind` for the objects `targets` (`N x H x W`).

    `points-k` adds corrective clicks against `model`'s own predictions, so the clicks depend
    on the model, as in interactive-segmentation benchmarks.
    """
    if kind == "box":
        return box_prompts(targets)
    prompts = center_point_prompts(targets)
    clicks = int(kind.split("-")[1]) if kind.startswith("points-") else 1
    for _ in range(clicks - 1):
        masks = decode(model, embedding, prompts, targets, original_size, mode)
        prompts = add_clicks(prompts, masks, targets)
    return prompts


def evaluate_image(
    tables: QualityTables,
    options: QualityOptions,
    image: torch.Tensor,
    targets: torch.Tensor,
    original_size: tuple[int, int],
    model: PromptableModel,
    teacher: Sam | None = None,
    teacher_embedding: torch.Tensor | None = None,
) -> ShownPrompts:
    """Add one image's objects to `tables`; returns, for each prompt kind measured with the
    single output, what the model (and the teacher) made of it, for overlays.

    image: `3 x S x S` preprocessed; targets: `N x H x W` bool at the original size;
    teacher_embedding: `1 x 256 x h x w`, the teacher's stored embedding (else it is computed).
    """
    areas = targets.flatten(1).sum(dim=1)
    embedding = encode_images(model, image[None])
    if teacher is not None and teacher_embedding is None:
        teacher_embedding = encode_images(teacher, image[None])
    shown: ShownPrompts = {}
    for kind in options.prompt_names():
        for mode in options.output_modes():
            prompts = make_prompts(kind, model, embedding, targets, original_size, mode)
            masks = decode(model, embedding, prompts, targets, original_size, mode)
            tables.model.add_masks(kind, mode, masks, targets, areas)
            if teacher is None or teacher_embedding is None:
                if mode == "single":
                    shown[kind] = (Shown(prompts, masks), None)
                continue
            own = make_prompts(kind, teacher, teacher_embedding, targets, original_size, mode)
            teacher_masks = decode(teacher, teacher_embedding, own, targets, original_size, mode)
            tables.teacher.add_masks(kind, mode, teacher_masks, targets, areas)
            if mode == "single":
                shown[kind] = (Shown(prompts, masks), Shown(own, teacher_masks))
            if kind.startswith("points-"):  # clicks differ; agreement needs the same prompts
                teacher_masks = decode(
                    teacher, teacher_embedding, prompts, targets, original_size, mode
                )
            tables.agreement.add_masks(kind, mode, masks, teacher_masks, areas)
    return shown
