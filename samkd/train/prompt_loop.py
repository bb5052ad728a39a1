"""Prompt-in-the-loop decoding (`train.prompt_iters > 1`), as in SAM's and EdgeSAM's training.

Iteration 1 decodes the sampled prompts (box or points). Each further iteration adds one
corrective click per object (`samkd.train.clicks`), from the error region between the
student's current mask and the target (the ground truth, or with `click_target: teacher` the
first teacher's current mask), and feeds the previous low-resolution logits back as the mask
prompt, per object with probability `mask_feedback_p`. An object's current mask is its
single-mask output, or for an ambiguous prompt (one point) the multimask output with the
highest predicted IoU, as SAM's training picks it. Clicks are placed on the low-resolution
grid (`4h x 4w`, 64 x 64 at 256 px) inside the unpadded image, at the centre of their grid
cell in the input frame.

Every teacher decodes the same prompt sequence, with its own previous logits as mask prompts.
The sequence is built under `no_grad`; gradients flow through every iteration's outputs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from segment_anything.modeling import MaskDecoder, PromptEncoder

from samkd.settings import TrainSettings
from samkd.train.clicks import ClickMode, hash_uniform, mix_seed, sample_clicks
from samkd.train.forward import DecoderOutputs, PromptGroup, group_task_weights, run_decoder


@dataclass(frozen=True)
class PromptLoop:
    """The loop's settings (`train.prompt_iters`, `mask_feedback_p`, `click_target`,
    `click_mode`)."""

    iterations: int
    feedback_p: float
    click_target: str
    click_mode: ClickMode

    @classmethod
    def of(cls, train: TrainSettings) -> PromptLoop | None:
        """The loop of a run; None for one-shot prompts (`prompt_iters: 1`)."""
        if train.prompt_iters == 1:
            return None
        return cls(train.prompt_iters, train.mask_feedback_p, train.click_target, train.click_mode)


@dataclass(frozen=True)
class TeacherDecoder:
    """A frozen teacher's prompt encoder and mask decoder, and its image embeddings
    `B x 256 x h x w` for the batch."""

    name: str
    prompt_encoder: PromptEncoder
    mask_decoder: MaskDecoder
    embeddings: torch.Tensor


@dataclass(frozen=True)
class Iteration:
    """One iteration's decoder outputs: the student's, and each teacher's by name."""

    student: DecoderOutputs
    teachers: dict[str, DecoderOutputs]


def current_logits(outputs: DecoderOutputs) -> torch.Tensor:
    """`N x 1 x 4h x 4w`: each object's single-mask logits, or for an ambiguous prompt the
    multimask logits with the highest predicted IoU."""
    best = outputs.iou[:, 1:].argmax(dim=1) + 1
    index = torch.where(outputs.ambiguous, best, 0)
    height, width = outputs.mask_logits.shape[-2:]
    return outputs.mask_logits.gather(1, index[:, None, None, None].expand(-1, 1, height, width))


def valid_region(groups: Sequence[PromptGroup], grid: int, image_size: int) -> torch.Tensor:
    """`N x grid x grid` bool: the low-resolution cells inside each object's unpadded image."""
    device = groups[0].objects.device
    index = torch.arange(grid, device=device)
    regions = []
    for group in groups:
        count = len(group.objects)
        if group.input_sizes is None:
            sizes = torch.full((count, 2), image_size, device=device)
        else:
            sizes = group.input_sizes
        height, width = sizes[:, 0, None, None], sizes[:, 1, None, None]
        # A cell is inside when its centre is: (i + 1/2) * image_size / grid < height.
        inside = ((2 * index[None, :, None] + 1) * image_size < 2 * height * grid) & (
            (2 * index[None, None, :] + 1) * image_size < 2 * width * grid
        )
        regions.append(inside)
    return torch.cat(regions)


def _with_click(
    group: PromptGroup,
    coords: torch.Tensor,
    labels: torch.Tensor,
    logits: torch.Tensor,
    feedback: torch.Tensor,
) -> PromptGroup:
    """`group` with one more point per object (`n x 2` input-frame coords, `n` labels) and
    `logits` (`n x 1 x 4h x 4w`) as its mask prompts where `feedback` (`n` bool)."""
    if group.point_coords is None or group.point_labels is None:
        point_coords, point_labels = coords[:, None], labels[:, None]
    else:
        old_coords, old_labels = group.point_coords, group.point_labels
        point_coords = torch.cat([old_coords, coords[:, None].to(dtype=old_coords.dtype)], 1)
        point_labels = torch.cat([old_labels, labels[:, None].to(dtype=old_labels.dtype)], 1)
    return dataclasses.replace(
        group,
        point_coords=point_coords,
        point_labels=point_labels,
        mask_inputs=logits,
        mask_feedback=feedback,
    )


def _split(values: torch.Tensor, groups: Sequence[PromptGroup]) -> list[torch.Tensor]:
    return list(values.split([len(group.objects) for group in groups]))


def next_prompts(
    loop: PromptLoop,
    iteration: Iteration,
    groups: Sequence[PromptGroup],
    targets: torch.Tensor | None,
    image_size: int,
    seed: int,
) -> tuple[list[PromptGroup], dict[str, list[PromptGroup]]]:
    """The student's and each teacher's groups of the next iteration (call under `no_grad`):
    the same points, each with its own previous logits as mask prompts.

    targets: ground truth `N x 4h x 4w` (needed with `click_target: gt`; objects without a
    target, task weight 0, are clicked towards the first teacher's mask); seed: this
    iteration's (for random clicks and the feedback draws).
    """
    logits = current_logits(iteration.student)
    teacher_masks = None
    if iteration.teachers:
        teacher_masks = current_logits(next(iter(iteration.teachers.values())))[:, 0] > 0
    weights = group_task_weights(groups)
    if loop.click_target == "teacher":
        assert teacher_masks is not None
        wanted = teacher_masks
    else:
        assert targets is not None
        wanted = targets > 0.5
        if weights is not None and teacher_masks is not None:
            wanted = torch.where(weights[:, None, None] > 0, wanted, teacher_masks)
    grid = logits.shape[-1]
    valid = valid_region(groups, grid, image_size)
    clicks = sample_clicks(logits[:, 0] > 0, wanted, loop.click_mode, mix_seed(seed, 0), valid)
    scale = image_size / grid
    coords = clicks.coords * scale + (scale - 1) / 2  # the centre pixel of the cell
    objects = torch.arange(len(logits), device=logits.device)
    feedback = hash_uniform(objects + mix_seed(seed, 1)) < loop.feedback_p
    parts = zip(
        groups,
        _split(coords, groups),
        _split(clicks.labels, groups),
        _split(logits, groups),
        _split(feedback, groups),
        strict=True,
    )
    student = [_with_click(*part) for part in parts]
    teachers = {
        name: [
            dataclasses.replace(group, mask_inputs=own)
            for group, own in zip(student, _split(current_logits(outputs), groups), strict=True)
        ]
        for name, outputs in iteration.teachers.items()
    }
    return student, teachers


def run_prompt_loop(
    loop: PromptLoop,
    prompt_encoder: PromptEncoder,
    mask_decoder: MaskDecoder,
    embeddings: torch.Tensor,
    groups: Sequence[PromptGroup],
    targets: torch.Tensor | None,
    teachers: Sequence[TeacherDecoder],
    record_upscaled: bool,
    seed: int,
) -> list[Iteration]:
    """Decode `loop.iterations` times, student (with gradients) and teachers (without).

    embeddings: the student's `B x 256 x h x w`; targets: ground truth `N x 4h x 4w` in the
    order of `groups`' objects; seed: non-negative, fixes the random clicks and feedback.
    """
    image_size = prompt_encoder.input_image_size[0]
    student_groups = list(groups)
    teacher_groups = {teacher.name: list(groups) for teacher in teachers}
    iterations = []
    for index in range(loop.iterations):
        student = run_decoder(
            prompt_encoder, mask_decoder, embeddings, student_groups, record_upscaled
        )
        with torch.no_grad():
            outputs = {
                teacher.name: run_decoder(
                    teacher.prompt_encoder,
                    teacher.mask_decoder,
                    teacher.embeddings,
                    teacher_groups[teacher.name],
                    record_upscaled,
                )
                for teacher in teachers
            }
        iterations.append(Iteration(student, outputs))
        if index + 1 < loop.iterations:
            with torch.no_grad():
                student_groups, teacher_groups = next_prompts(
                    loop,
                    iterations[-1],
                    student_groups,
                    targets,
                    image_size,
                    mix_seed(seed, index),
                )
    return iterations
