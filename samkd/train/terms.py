"""The loss terms of a run, fixed at set-up, and how each is normalised.

Every term is a mean over its *units*: SAM's task terms over the objects that have a target
(ground truth, or teacher masks weighed by `train.pseudo_mask_weight`), the decoder terms over
all prompted objects (label-free prompts included), the encoder, attention and (per-image) RKD
terms over images, across-batch RKD over micro-batches. A micro-step reports each term as a
sum over its units and the number of units, `K` values each, in the schema's order: a
micro-batch without prompts reports its object terms as 0 over 0 objects, so the vector has
the same names on every rank and in every micro-step, and reducing it over ranks is one
collective of fixed size.

A step's loss is each term's sum over the whole step (all micro-steps and ranks) divided by
its units in the whole step, weighted and added up. A micro-step back-propagates its share,
its sums over the step's unit counts, so gradient accumulation and data parallelism give the
gradient of one batch of the same images, however the labelled objects fall.

Three logged values are derived, not back-propagated: `task/total` (the task terms weighted by
`train.task_loss_weights`, by default 20 focal + dice + IoU MSE, per object), `kd/weighted` (the
distillation loss before `lambda_kd`) and `loss/total`, both one value per step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from samkd.train.task_loss import SAM_TASK_WEIGHTS, TaskLossWeights

UNITS = ("image", "object", "batch", "step", "target")
TASK_TOTAL, KD_WEIGHTED, LOSS_TOTAL = "task/total", "kd/weighted", "loss/total"


def iteration_name(term: str, index: int) -> str:
    """The logged name of `term` in the prompt loop's iteration `index` (from 1)."""
    return f"{term}@{index}"


@dataclass(frozen=True)
class UnitCounts:
    """How many of each unit a micro-step covers, or a whole step (on every rank).

    targets: the objects with a task-loss target (weight above 0); None: all of them."""

    images: int
    objects: int
    batches: int = 1
    steps: int = 1
    targets: int | None = None

    def vector(self, device: torch.device) -> torch.Tensor:
        """float32 `5` in the order of `UNITS`; the copy does not block."""
        targets = self.objects if self.targets is None else self.targets
        values = [self.images, self.objects, self.batches, self.steps, targets]
        return torch.tensor(values, dtype=torch.float32).to(device, non_blocking=True)


@dataclass(frozen=True)
class TermSchema:
    """Names, units and weights of every logged term, in the order of the term vectors, and
    the same as tensors on `device` (made once: the step reads them without copies).

    weights: each term's weight in the loss (`w_t * lambda_term` for distillation terms, before
    `lambda_kd`; 0 for the derived values); distillation: which terms `lambda_kd` multiplies;
    task_weights: those of the task terms, which also make `task/total`.
    """

    names: tuple[str, ...]
    units: tuple[str, ...]
    weights: tuple[float, ...]
    distillation: tuple[bool, ...]
    task_weights: TaskLossWeights = SAM_TASK_WEIGHTS
    device: torch.device = torch.device("cpu")
    unit_index: torch.Tensor = field(init=False, repr=False)
    weight_vector: torch.Tensor = field(init=False, repr=False)
    kd_mask: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        def tensor(values: Sequence[float], dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype).to(self.device)

        units = [UNITS.index(unit) for unit in self.units]
        object.__setattr__(self, "unit_index", tensor(units, torch.long))
        object.__setattr__(self, "weight_vector", tensor(self.weights, torch.float32))
        object.__setattr__(self, "kd_mask", tensor(self.distillation, torch.bool))

    @classmethod
    def build(
        cls,
        task: bool,
        distillation: dict[str, tuple[float, str]],
        prompt_iters: int = 1,
        task_weights: TaskLossWeights = SAM_TASK_WEIGHTS,
    ) -> TermSchema:
        """The schema of a run: SAM's task terms (weighted by `task_weights`) when `task`, then
        `distillation` (name -> weight, unit, in order), then the derived values. With a prompt
        loop, each task and decoder term (a mean over the iterations) is also logged per
        iteration, as `<name>@<i>` (derived)."""
        rows: list[tuple[str, str, float, bool]] = []
        if task:
            rows += [
                (f"task/{name}", "target", weight, False) for name, weight in task_weights.items()
            ]
            rows.append((TASK_TOTAL, "target", 0.0, False))
        rows += [(name, unit, weight, True) for name, (weight, unit) in distillation.items()]
        if prompt_iters > 1:
            rows += [
                (iteration_name(name, index), unit, 0.0, False)
                for name, unit, _, _ in list(rows)
                if unit in ("target", "object")
                for index in range(1, prompt_iters + 1)
            ]
        if distillation:
            rows.append((KD_WEIGHTED, "step", 0.0, False))
        rows.append((LOSS_TOTAL, "step", 0.0, False))
        names, units, weights, kd = zip(*rows, strict=True)
        return cls(names, units, weights, kd, task_weights)

    def to(self, device: torch.device) -> TermSchema:
        return dataclasses.replace(self, device=device)

    def __len__(self) -> int:
        return len(self.names)

    def index(self, name: str) -> int:
        return self.names.index(name)

    def loss_weights(
        self, lambda_kd: float, step_units: torch.Tensor, world_size: int
    ) -> torch.Tensor:
        """`2 x K` float32: row 0 turns a micro-step's term sums into its share of the step's
        loss, row 1 into its share of `kd/weighted`.

        step_units: the step's unit counts over all ranks (`UnitCounts.vector`, reduced). Each
        rank's share is scaled by `world_size` because data parallelism averages gradients.
        """
        per_term = step_units[self.unit_index].clamp_min(1) / world_size
        loss = torch.where(self.kd_mask, self.weight_vector * lambda_kd, self.weight_vector)
        kd = self.weight_vector * self.kd_mask
        return torch.stack([loss, kd]) / per_term

    def unit_counts(self, counts: torch.Tensor, last_micro_step: bool) -> torch.Tensor:
        """`K` units of each term in a micro-step with `counts` (`UnitCounts.vector`); per-step
        values count once, in the step's last micro-step."""
        per_term = counts[self.unit_index]
        if last_micro_step:
            return per_term
        return torch.where(self.unit_index == UNITS.index("step"), 0.0, per_term)
