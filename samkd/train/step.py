"""One optimizer step: micro-steps that accumulate gradients, then the update, all without a
host-device sync (see `samkd.train.terms` for how the terms are normalised)."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from segment_anything.modeling import Sam
from torch import nn

from samkd.distill import DistillationObjective
from samkd.errors import UsageError
from samkd.models import DECODER_UPSCALED, AttentionCapture
from samkd.models.frames import LONGEST_SIDE, Frame
from samkd.runtime import Distributed, Precision
from samkd.settings import Settings
from samkd.train.batches import TrainingBatch
from samkd.train.clicks import mix_seed
from samkd.train.forward import (
    DecoderOutputs,
    PromptGroup,
    decoder_features,
    encoder_forward,
    group_targets,
    group_task_weights,
    high_res_of,
    prompt_groups,
)
from samkd.train.frames import decode_in_frame
from samkd.train.progress import Progress
from samkd.train.prompt_loop import Iteration, PromptLoop, TeacherDecoder, run_prompt_loop
from samkd.train.task_loss import (
    SAM_TASK_WEIGHTS,
    TaskLossWeights,
    combine_task_losses,
    sam_task_loss,
)
from samkd.train.teachers import (
    Teacher,
    native_features,
    split_taps,
    teacher_decoders,
    teacher_features,
)
from samkd.train.terms import (
    KD_WEIGHTED,
    LOSS_TOTAL,
    TASK_TOTAL,
    TermSchema,
    UnitCounts,
    iteration_name,
)

TeacherTaps = Mapping[str, Mapping[str, torch.Tensor | AttentionCapture]]


class DistillationStep(nn.Module):
    """The student, the objective's adapters and the loss of one micro-batch, as one module, so
    that DistributedDataParallel synchronises them all with one call of `forward`.

    With a prompt loop (`samkd.train.prompt_loop`), each task and decoder term is its mean over
    the loop's iterations. A SAM 2 student in the `square` frame (its `frame`) takes the
    batch's square images, and its outputs are mapped into the pipeline's frame
    (`samkd.train.frames`)."""

    def __init__(
        self,
        student: Sam,
        objective: DistillationObjective | None,
        schema: TermSchema,
        task_loss: bool = True,
        loop: PromptLoop | None = None,
    ) -> None:
        super().__init__()
        self.student = student
        self.objective = objective
        self.schema = schema
        self.task_loss = task_loss
        self.loop = loop
        self.student_frame: Frame = getattr(student, "frame", LONGEST_SIDE)
        taps = objective.required_student_taps() if objective is not None else []
        self.encoder_taps, self.decoder_taps = split_taps(taps)
        if loop is not None and loop.click_target == "teacher" and not self.decoder_taps:
            raise UsageError(
                "train.click_target teacher needs the teachers' decoders: switch on "
                "distillation.decoder (with a teacher and lambda_kd > 0)"
            )

    def forward(
        self,
        images: torch.Tensor,
        groups: Sequence[PromptGroup],
        targets: torch.Tensor | None,
        teachers: TeacherTaps,
        unit_counts: torch.Tensor,
        loss_weights: torch.Tensor,
        loop_teachers: Sequence[TeacherDecoder] | None = None,
        seed: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """This micro-step's share of the step's loss, and its term sums (`K`, detached).

        images: `B x 3 x S x S`; groups: the prompts of the labelled objects (may be empty);
        targets: their low-resolution masks `N x 4h x 4w`; unit_counts: `K` units of each term
        in this micro-batch; loss_weights: `2 x K` (`TermSchema.loss_weights`);
        loop_teachers: None for one-shot decoding (validation, `prompt_iters: 1`; `teachers`
        then hold the teachers' decoder taps), else the teachers' decoders for the prompt loop
        (every teacher with decoder terms); seed: fixes the loop's random draws.
        """
        embeddings, student_features = encoder_forward(self.student, images, self.encoder_taps)
        high_res = high_res_of(student_features)
        means: dict[str, torch.Tensor] = {}
        looped = self.loop is not None and loop_teachers is not None
        if groups and looped:
            assert self.loop is not None and loop_teachers is not None
            iterations = run_prompt_loop(
                self.loop,
                self.student.prompt_encoder,
                self.student.mask_decoder,
                embeddings,
                groups,
                targets,
                loop_teachers,
                record_upscaled=DECODER_UPSCALED in self.decoder_taps,
                seed=seed,
                student_high_res=high_res,
                student_frame=self.student_frame,
            )
            means.update(self._loop_means(iterations, targets, group_task_weights(groups)))
        elif groups:
            decoded = decode_in_frame(
                self.student.prompt_encoder,
                self.student.mask_decoder,
                embeddings,
                groups,
                DECODER_UPSCALED in self.decoder_taps,
                high_res,
                self.student_frame,
            )
            student_features.update(decoder_features(decoded, self.decoder_taps))
            if self.task_loss and targets is not None:
                object_weights = group_task_weights(groups)
                task_weights = self.schema.task_weights
                means.update(task_terms(decoded, targets, object_weights, task_weights))
        if self.objective is not None:
            with_decoder = bool(groups) and not looped
            means.update(self.objective(student_features, teachers, with_decoder=with_decoder))
        sums = self._term_vector(means, embeddings) * unit_counts
        # Not a matmul: autocast would run that in bf16.
        loss, kd_weighted = (loss_weights * sums).sum(dim=1)
        # Which decoder parameters a batch uses depends on its prompts (boxes or points, or
        # none): every one takes part, with a zero gradient when unused, so that DDP needs no
        # search for unused parameters and accumulation matches one large batch.
        loss = loss + 0.0 * sum(p.sum() for p in self._decoder_parameters())
        # Per-step values: each micro-step adds its share; they count once per step.
        sums = sums.detach().clone()
        sums[self.schema.index(LOSS_TOTAL)] = loss.detach()
        if KD_WEIGHTED in self.schema.names:
            sums[self.schema.index(KD_WEIGHTED)] = kd_weighted.detach()
        return loss, sums

    def _loop_means(
        self,
        iterations: Sequence[Iteration],
        targets: torch.Tensor | None,
        object_weights: torch.Tensor | None,
    ) -> dict[str, torch.Tensor]:
        """Each task and decoder term's mean over the prompt loop's iterations, and its value
        in each iteration (`<name>@<i>`, logged only). object_weights: `N`, see
        `sam_task_loss`."""
        task_weights = self.schema.task_weights
        per_iteration = []
        for iteration in iterations:
            terms: dict[str, torch.Tensor] = {}
            decoded = iteration.student
            if self.task_loss and targets is not None:
                terms.update(task_terms(decoded, targets, object_weights, task_weights))
            if self.objective is not None:
                student = decoder_features(decoded, self.decoder_taps)
                teachers = {
                    name: decoder_features(outputs, self.decoder_taps)
                    for name, outputs in iteration.teachers.items()
                }
                terms.update(self.objective.decoder_terms(student, teachers))
            per_iteration.append(terms)
        means = {
            name: torch.stack([terms[name] for terms in per_iteration]).mean()
            for name in per_iteration[0]
        }
        for index, terms in enumerate(per_iteration, start=1):
            means.update({iteration_name(name, index): value for name, value in terms.items()})
        return means

    def _term_vector(self, means: dict[str, torch.Tensor], like: torch.Tensor) -> torch.Tensor:
        """`K` float32 in schema order; terms this micro-batch lacks (and derived ones) are 0."""
        zero = like.new_zeros((), dtype=torch.float32)
        return torch.stack([means.get(name, zero).float() for name in self.schema.names])

    def _decoder_parameters(self) -> list[nn.Parameter]:
        parts = (self.student.prompt_encoder, self.student.mask_decoder)
        return [p for part in parts for p in part.parameters() if p.requires_grad]


def task_terms(
    decoded: DecoderOutputs,
    targets: torch.Tensor,
    weights: torch.Tensor | None,
    term_weights: TaskLossWeights = SAM_TASK_WEIGHTS,
) -> dict[str, torch.Tensor]:
    """SAM's task terms and their total (weighted by `term_weights`) for decoded objects with
    targets `N x 4h x 4w` (`weights`: `N`, per object, see `sam_task_loss`)."""
    task = sam_task_loss(
        decoded.mask_logits, decoded.iou, targets, decoded.ambiguous, weights, term_weights
    )
    terms = {f"task/{name}": value for name, value in task.items()}
    terms[TASK_TOTAL] = combine_task_losses(task, term_weights)
    return terms


@dataclass(frozen=True)
class StepParts:
    """What every training step uses. `forward` is the `DistillationStep`, maybe wrapped in
    DistributedDataParallel (`ddp`) and torch.compile."""

    forward: Any
    ddp: nn.parallel.DistributedDataParallel | None
    teachers: list[Teacher]
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    settings: Settings
    precision: Precision
    device: torch.device
    dist: Distributed


@dataclass
class StepTerms:
    """The term sums and unit counts of one optimizer step, added up over its micro-steps on
    the device (`K` float32 each, in schema order)."""

    sums: torch.Tensor | None = None
    counts: torch.Tensor | None = None

    def add(self, sums: torch.Tensor, counts: torch.Tensor) -> None:
        self.sums = sums if self.sums is None else self.sums + sums
        self.counts = counts if self.counts is None else self.counts + counts

    def nonfinite(self) -> torch.Tensor:
        """float32 scalar: 1 when a term of some micro-step was NaN or infinite, else 0."""
        assert self.sums is not None
        return (~torch.isfinite(self.sums).all()).float()


def step_module_of(forward: Any) -> DistillationStep:
    """The DistillationStep inside a DDP wrapper or compiled module."""
    module = getattr(forward, "_orig_mod", forward)
    module = getattr(module, "module", module)
    assert isinstance(module, DistillationStep)
    return module


def step_unit_counts(
    micro_counts: Sequence[UnitCounts], device: torch.device, dist: Distributed
) -> torch.Tensor:
    """The units of the whole step, over every rank (`UnitCounts.vector` layout): one
    collective of fixed size per step, whatever the data."""
    total = UnitCounts(
        images=sum(c.images for c in micro_counts),
        objects=sum(c.objects for c in micro_counts),
        batches=len(micro_counts),
        targets=sum(c.objects if c.targets is None else c.targets for c in micro_counts),
    ).vector(device)
    if dist.enabled:
        torch.distributed.all_reduce(total)
    return total


def train_step(
    parts: StepParts, micro_batches: Sequence[TrainingBatch], progress: Progress
) -> None:
    """One optimizer step over `micro_batches` (gradients accumulate over them, and ranks
    all-reduce them in the last one only), with no host-device sync.

    Backward always runs. When a term of some micro-step is not finite (on any rank), or the
    gradient norm is not, the whole step is skipped on the device (see `optimizer_step`); it
    still counts as a step (the schedule moves on) and `progress` tallies it, for the loop to
    read back at its next logging step, validation or checkpoint.
    """
    step_module = step_module_of(parts.forward)
    schema = step_module.schema
    targets = [batch.num_targets() for batch in micro_batches]  # on the host, before the copy
    batches = [batch.to(parts.device) for batch in micro_batches]
    groups = [prompt_groups(batch, parts.device) for batch in batches]
    counts = [
        UnitCounts(batch.images.shape[0], sum(len(g.objects) for g in batch_groups), targets=n)
        for batch, batch_groups, n in zip(batches, groups, targets, strict=True)
    ]
    objective = step_module.objective
    lambda_kd = 0.0 if objective is None else objective.kd_weight.value
    step_units = step_unit_counts(counts, parts.device, parts.dist)
    loss_weights = schema.loss_weights(lambda_kd, step_units, parts.dist.world_size)
    terms = StepTerms()
    for index, batch in enumerate(batches):
        last = index == len(batches) - 1
        unit_counts = schema.unit_counts(counts[index].vector(parts.device), last)
        # Gradients are all-reduced once, in the last micro-step.
        sync = contextlib.nullcontext() if parts.ddp is None or last else parts.ddp.no_sync()
        seed = mix_seed(parts.settings.train.seed, progress.step, index, parts.dist.rank)
        with sync:
            loss, sums = micro_step(parts, batch, groups[index], unit_counts, loss_weights, seed)
            parts.scaler.scale(loss).backward()
        terms.add(sums, unit_counts)
    skip = terms.nonfinite()
    if parts.dist.enabled:  # ranks must skip a step together; MAX keeps the flag on the device
        torch.distributed.all_reduce(skip, op=torch.distributed.ReduceOp.MAX)
    skip = optimizer_step(
        step_module, parts.optimizer, parts.scaler, parts.settings, progress.step, skip
    )
    assert terms.sums is not None and terms.counts is not None
    progress.record_step(terms.sums, terms.counts, skip)
    progress.step += 1


def micro_step(
    parts: StepParts,
    batch: TrainingBatch,
    groups: Sequence[PromptGroup],
    unit_counts: torch.Tensor,
    loss_weights: torch.Tensor,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss share and term sums of one micro-batch (on the device already): every labelled
    object gets SAM's task loss, every image the distillation terms. seed: the prompt loop's
    for this micro-batch (non-negative)."""
    targets = group_targets(batch, groups) if groups else None
    module = step_module_of(parts.forward)
    taps = module.decoder_taps
    images = batch.frame_inputs(module.student_frame)
    with parts.precision.autocast(parts.device):
        native = native_features(parts.teachers, batch)
        if module.loop is None:
            features = teacher_features(parts.teachers, batch, groups, taps, native)
            return parts.forward(images, groups, targets, features, unit_counts, loss_weights)
        # The loop decodes the teachers itself, with the prompts it builds.
        features = teacher_features(parts.teachers, batch, groups, [], native)
        decoders = teacher_decoders(parts.teachers, native) if taps else []
        return parts.forward(
            images, groups, targets, features, unit_counts, loss_weights, decoders, seed
        )


def optimizer_step(
    step_module: DistillationStep,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    settings: Settings,
    step: int,
    skip: torch.Tensor,
) -> torch.Tensor:
    """Drop the gradients of parts still frozen at `step`, clip, and update, all on the device.

    The update leaves parameters and optimizer state as they are when `skip` (float32 0/1
    scalar) is 1 or, without the fp16 scaler, when the gradient norm is not finite: the fused
    AdamW kernel reads the flag from `optimizer.found_inf`. The fp16 scaler sets that attribute
    itself from its own check of the gradients; gradient overflows are its to handle (it lowers
    its scale, routinely so early in a run), so only `skip` is folded into its check, and a
    skipped step lowers the scale too. Returns the flag the update used.
    """
    for part, first_step in settings.train.frozen_until.items():
        if first_step == -1 or step < first_step:
            for parameter in getattr(step_module.student, part).parameters():
                parameter.grad = None
    scaler.unscale_(optimizer)
    norm = None
    if settings.train.grad_clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(step_module.parameters(), settings.train.grad_clip)
    if scaler.is_enabled():
        # The scaler's (private) per-device flags are what both its step and update read.
        for found_inf in scaler._found_inf_per_device(optimizer).values():
            torch.maximum(found_inf, skip.to(found_inf.device, non_blocking=True), out=found_inf)
    else:
        if norm is None:  # without clipping, the norm only tells whether gradients are finite
            gradients = [p.grad for p in step_module.parameters() if p.grad is not None]
            norm = torch.nn.utils.get_total_norm(gradients)
        skip = torch.maximum(skip, (~torch.isfinite(norm)).float())
        optimizer.found_inf = skip  # type: ignore[attr-defined]
    scaler.step(optimizer)
    scaler.update()
    if hasattr(optimizer, "found_inf"):  # ours; the scaler removes its own
        del optimizer.found_inf
    optimizer.zero_grad(set_to_none=True)
    return skip
