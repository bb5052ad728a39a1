"""Training progress: what a checkpoint carries besides the weights, and the tallies of logged
terms and skipped steps.

A training step must not make the host wait for the device, so a step whose loss or gradients
are not finite is skipped on the device (see `samkd.train.loop.optimizer_step`), and the terms
and the skipped steps are tallied there too. The tallies are read back only where the loop
waits for the device anyway: at logging steps, validation and checkpoints. A run of skipped
steps long enough to abort is therefore noticed at the next of those, not at once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from loguru import logger

from samkd.errors import UsageError
from samkd.runtime import Distributed

Names = tuple[str, ...]


class NonFiniteLossError(UsageError):
    """Too many consecutive steps had a non-finite loss or gradients."""


@dataclass
class StepTerms:
    """The loss terms of one optimizer step, summed over its micro-steps on the device.

    A micro-step's terms go in as one vector (`K` float32 values for `K` names), so that adding
    them costs a few kernels rather than a few per term. Batches without masks have no task
    terms, hence one vector per set of names.
    """

    sums: dict[Names, torch.Tensor] = field(default_factory=dict)
    counts: dict[Names, int] = field(default_factory=dict)

    def add(self, terms: Mapping[str, torch.Tensor], device: torch.device) -> None:
        names = tuple(terms)
        # Some terms (kd/lambda) are host scalars: copy them without waiting for the device.
        values = torch.stack(
            [terms[name].detach().float().to(device, non_blocking=True) for name in names]
        )
        self.sums[names] = self.sums[names] + values if names in self.sums else values
        self.counts[names] = self.counts.get(names, 0) + 1

    def nonfinite(self) -> torch.Tensor:
        """float32 scalar: 1 when a term of some micro-step was NaN or infinite (a sum is
        finite only when all its parts are; `loss/total` is a term), else 0."""
        finite = torch.stack([torch.isfinite(sums).all() for sums in self.sums.values()]).all()
        return (~finite).float()


@dataclass(frozen=True)
class Tallies:
    """The device tallies, read back.

    means: each term's mean over the micro-steps kept since the last record;
    nonfinite_terms: terms that were NaN or infinite in a step skipped since the last record.
    """

    means: dict[str, float]
    nonfinite_terms: list[str]
    skipped_total: int
    longest_skipped_run: int


def _scalar(value: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.tensor(value, dtype=dtype, device=device)


@dataclass
class Progress:
    """What a checkpoint must carry besides the weights, so a resumed run continues exactly.

    On `device`: `skipped_total` (int64 scalar), `skipped_run` (steps skipped in a row up to
    now) and `longest_skipped_run`; and, per set of term names (see `StepTerms`), the sums
    (`K` float32) and count (float32 scalar) of the micro-steps kept since the last record and
    which terms were non-finite in a skipped step (`K` bool).
    """

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    step: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    skipped_reported: int = 0  # `skipped_total` when it was last read back
    skipped_total: torch.Tensor = field(init=False)
    skipped_run: torch.Tensor = field(init=False)
    longest_skipped_run: torch.Tensor = field(init=False)
    term_sums: dict[Names, torch.Tensor] = field(default_factory=dict)
    term_counts: dict[Names, torch.Tensor] = field(default_factory=dict)
    term_nonfinite: dict[Names, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.skipped_total = _scalar(0, torch.int64, self.device)
        self.skipped_run = _scalar(0, torch.int64, self.device)
        self.longest_skipped_run = _scalar(0, torch.int64, self.device)

    def record_step(self, terms: StepTerms, skip: torch.Tensor) -> None:
        """Count one optimizer step; its terms enter the logged means unless it was skipped.

        skip: float32 scalar on the device, 1 when the step was skipped, else 0.
        """
        skipped = skip > 0
        for names, sums in terms.sums.items():
            kept = torch.where(skipped, 0.0, sums)  # not a product: NaN * 0 is NaN
            count = (1 - skip) * terms.counts[names]
            bad = ~torch.isfinite(sums)
            if names in self.term_sums:
                kept = self.term_sums[names] + kept
                count = self.term_counts[names] + count
                bad = self.term_nonfinite[names] | bad
            self.term_sums[names], self.term_counts[names] = kept, count
            self.term_nonfinite[names] = bad
        self.skipped_total = self.skipped_total + skipped
        self.skipped_run = torch.where(skipped, self.skipped_run + 1, 0)
        self.longest_skipped_run = torch.maximum(self.longest_skipped_run, self.skipped_run)

    def reset_terms(self) -> None:
        """Start the next record's tallies."""
        self.term_sums, self.term_counts, self.term_nonfinite = {}, {}, {}

    def read(self) -> Tallies:
        """The tallies as numbers, in one host-device sync."""
        keys = list(self.term_sums)
        parts = [torch.stack([self.skipped_total, self.longest_skipped_run]).float()]
        for names in keys:
            parts.append(self.term_sums[names])
            parts.append(self.term_counts[names].reshape(1))
            parts.append(self.term_nonfinite[names].float())
        values = iter(torch.cat(parts).tolist())
        skipped_total, longest_run = int(next(values)), int(next(values))
        totals: dict[str, list[float]] = {}  # name -> [sum, count]
        nonfinite: set[str] = set()
        for names in keys:
            sums = [next(values) for _ in names]
            count = next(values)
            for name, value in zip(names, sums, strict=True):
                total = totals.setdefault(name, [0.0, 0.0])
                total[0] += value
                total[1] += count
            nonfinite.update(name for name in names if next(values))
        means = {name: total / count for name, (total, count) in totals.items() if count}
        return Tallies(means, sorted(nonfinite), skipped_total, longest_run)

    def check_skipped(self, tallies: Tallies, max_run: int, checkpoint_path: Path) -> None:
        """Warn about the steps skipped since the last check, naming their non-finite terms,
        and raise `NonFiniteLossError` once `max_run` steps in a row were skipped."""
        new = tallies.skipped_total - self.skipped_reported
        self.skipped_reported = tallies.skipped_total
        causes = ", ".join(tallies.nonfinite_terms) or "gradients"
        if new:
            logger.warning(
                f"step {self.step}: {new} more step(s) skipped ({tallies.skipped_total} in all), "
                f"non-finite {causes}"
            )
        if tallies.longest_skipped_run >= max_run:
            raise NonFiniteLossError(
                f"{tallies.longest_skipped_run} consecutive steps had a non-finite loss or "
                f"gradients ({causes}); stopped at step {self.step}, the last good checkpoint "
                f"is {checkpoint_path}"
            )

    def reduce_over_ranks(self, dist: Distributed) -> None:
        """Make the term tallies those of the whole global batch, not this rank's share (the
        skip counters agree on every rank already: ranks skip steps together)."""
        if not dist.enabled:
            return
        for names in sorted(self.term_sums):
            torch.distributed.all_reduce(self.term_sums[names])
            torch.distributed.all_reduce(self.term_counts[names])
            flags = self.term_nonfinite[names].float()
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
            self.term_nonfinite[names] = flags > 0

    def state_dict(self) -> dict[str, Any]:
        """Plain numbers (read back from the device), so a checkpoint loads on any device."""
        return {
            "step": self.step,
            "best_metric": self.best_metric,
            "best_step": self.best_step,
            "evals_without_improvement": self.evals_without_improvement,
            "skipped_reported": self.skipped_reported,
            "skipped_total": int(self.skipped_total),
            "skipped_run": int(self.skipped_run),
            "longest_skipped_run": int(self.longest_skipped_run),
            "terms": [
                {
                    "names": list(names),
                    "sums": self.term_sums[names].tolist(),
                    "count": float(self.term_counts[names]),
                    "nonfinite": self.term_nonfinite[names].tolist(),
                }
                for names in self.term_sums
            ],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The inverse of `state_dict` (float32 sums survive the round trip exactly)."""
        self.step = state["step"]
        self.best_metric, self.best_step = state["best_metric"], state["best_step"]
        self.evals_without_improvement = state["evals_without_improvement"]
        self.skipped_reported = state.get("skipped_reported", 0)
        device = self.device
        self.skipped_total = _scalar(state.get("skipped_total", 0), torch.int64, device)
        self.skipped_run = _scalar(state.get("skipped_run", 0), torch.int64, device)
        longest = state.get("longest_skipped_run", 0)
        self.longest_skipped_run = _scalar(longest, torch.int64, device)
        self.reset_terms()
        for entry in state.get("terms", []):
            names = tuple(entry["names"])
            self.term_sums[names] = torch.tensor(entry["sums"], dtype=torch.float32, device=device)
            self.term_counts[names] = _scalar(entry["count"], torch.float32, device)
            self.term_nonfinite[names] = torch.tensor(
                entry["nonfinite"], dtype=torch.bool, device=device
            )
