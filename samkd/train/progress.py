"""Training progress: what a checkpoint carries besides the weights, and the tallies of logged
terms and skipped steps.

A training step must not make the host wait for the device, so a step whose loss or gradients
are not finite is skipped on the device (see `samkd.train.step.optimizer_step`), and the terms
and the skipped steps are tallied there too. The tallies are read back only where the loop
waits for the device anyway: at logging steps, validation and checkpoints. A run of skipped
steps long enough to abort is therefore noticed at the next of those, not at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from loguru import logger

from samkd.errors import UsageError
from samkd.runtime import Distributed


class NonFiniteLossError(UsageError):
    """Too many consecutive steps had a non-finite loss or gradients."""


@dataclass(frozen=True)
class Tallies:
    """The device tallies, read back.

    means: each term's mean over its units in the steps kept since the last record (None: none);
    nonfinite_terms: terms that were NaN or infinite in a step skipped since the last record.
    """

    means: dict[str, float | None]
    nonfinite_terms: list[str]
    skipped_total: int
    longest_skipped_run: int


def _scalar(value: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.tensor(value, dtype=dtype, device=device)


@dataclass
class Progress:
    """What a checkpoint must carry besides the weights, so a resumed run continues exactly.

    On `device`: `skipped_total` (int64 scalar), `skipped_run` (steps skipped in a row up to
    now) and `longest_skipped_run`; and, for the `names` of the run's terms (its
    `TermSchema`), the sums and unit counts (`K` float32 each) of the steps kept since the last
    record and which terms were non-finite in a skipped step (`K` bool).
    """

    names: tuple[str, ...] = ()
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    step: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    skipped_reported: int = 0  # `skipped_total` when it was last read back
    skipped_total: torch.Tensor = field(init=False)
    skipped_run: torch.Tensor = field(init=False)
    longest_skipped_run: torch.Tensor = field(init=False)
    term_sums: torch.Tensor = field(init=False)
    term_counts: torch.Tensor = field(init=False)
    term_nonfinite: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.skipped_total = _scalar(0, torch.int64, self.device)
        self.skipped_run = _scalar(0, torch.int64, self.device)
        self.longest_skipped_run = _scalar(0, torch.int64, self.device)
        self.reset_terms()

    def record_step(self, sums: torch.Tensor, counts: torch.Tensor, skip: torch.Tensor) -> None:
        """Count one optimizer step; its term sums and counts (`K` each) enter the logged
        means unless it was skipped (`skip`: float32 scalar on the device, 1 or 0)."""
        skipped = skip > 0
        self.term_sums += torch.where(skipped, 0.0, sums)  # not a product: NaN * 0 is NaN
        self.term_counts += torch.where(skipped, 0.0, counts)
        self.term_nonfinite |= ~torch.isfinite(sums)
        self.skipped_total = self.skipped_total + skipped
        self.skipped_run = torch.where(skipped, self.skipped_run + 1, 0)
        self.longest_skipped_run = torch.maximum(self.longest_skipped_run, self.skipped_run)

    def reset_terms(self) -> None:
        """Start the next record's tallies."""
        size = len(self.names)
        self.term_sums = torch.zeros(size, device=self.device)
        self.term_counts = torch.zeros(size, device=self.device)
        self.term_nonfinite = torch.zeros(size, dtype=torch.bool, device=self.device)

    def read(self) -> Tallies:
        """The tallies as numbers, in one host-device sync. A term with no units since the
        last record (no labelled object, say) has the mean None."""
        counters = torch.stack([self.skipped_total, self.longest_skipped_run]).float()
        flags = self.term_nonfinite.float()
        values = torch.cat([counters, self.term_sums, self.term_counts, flags]).tolist()
        size = len(self.names)
        sums, counts = values[2 : 2 + size], values[2 + size : 2 + 2 * size]
        flagged = values[2 + 2 * size :]
        means = {
            name: total / count if count else None
            for name, total, count in zip(self.names, sums, counts, strict=True)
        }
        nonfinite = sorted(name for name, flag in zip(self.names, flagged, strict=True) if flag)
        return Tallies(means, nonfinite, int(values[0]), int(values[1]))

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
        """Make the term tallies those of the whole global batch, not this rank's share, in one
        collective of fixed size (the skip counters agree on every rank already: ranks skip
        steps together)."""
        if not dist.enabled:
            return
        size = len(self.names)
        flags = self.term_nonfinite.float()
        packed = torch.cat([self.term_sums, self.term_counts, flags])
        torch.distributed.all_reduce(packed)
        self.term_sums, self.term_counts = packed[:size], packed[size : 2 * size]
        self.term_nonfinite = packed[2 * size :] > 0

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
            "terms": {
                "names": list(self.names),
                "sums": self.term_sums.tolist(),
                "counts": self.term_counts.tolist(),
                "nonfinite": self.term_nonfinite.tolist(),
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The inverse of `state_dict` (float32 sums survive the round trip exactly)."""
        terms = state["terms"]
        if not isinstance(terms, dict):  # samkd 0.1.0 kept one entry per set of names
            raise UsageError("the checkpoint was written by an older samkd; start a new run")
        if tuple(terms["names"]) != self.names:
            raise UsageError(
                f"the checkpoint logs the terms {terms['names']}, this run {list(self.names)}"
            )
        self.step = state["step"]
        self.best_metric, self.best_step = state["best_metric"], state["best_step"]
        self.evals_without_improvement = state["evals_without_improvement"]
        self.skipped_reported = state["skipped_reported"]
        device = self.device
        self.skipped_total = _scalar(state["skipped_total"], torch.int64, device)
        self.skipped_run = _scalar(state["skipped_run"], torch.int64, device)
        self.longest_skipped_run = _scalar(state["longest_skipped_run"], torch.int64, device)
        self.term_sums = torch.tensor(terms["sums"], dtype=torch.float32, device=device)
        self.term_counts = torch.tensor(terms["counts"], dtype=torch.float32, device=device)
        self.term_nonfinite = torch.tensor(terms["nonfinite"], dtype=torch.bool, device=device)
