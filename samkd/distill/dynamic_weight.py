"""The distillation weight `lambda_kd(t)`, lowered when the validation metric plateaus (and
raised back when it improves, with `raise_factor`).

`lambda_kd` starts at `initial`. After each evaluation, `step(metric)`:

- counts the evaluation as an improvement when the metric beats the best so far by more than
  `threshold` (absolute: `metric > best + threshold` in mode max, `metric < best - threshold`
  in mode min, the metric's own unless `mode` is set: `resolved_mode`; the first finite metric
  always improves; a non-finite one never does);
- while a cooldown is running, counts down and ignores non-improving evaluations;
- once more than `patience` evaluations in a row have not improved, multiplies `lambda_kd` by
  `factor` (never below `min_lambda`), resets the count and starts `cooldown` evaluations of
  cooldown (the same rule as `torch.optim.lr_scheduler.ReduceLROnPlateau`);
- with `raise_factor` set, after an improving evaluation multiplies `lambda_kd` by
  `raise_factor`, never above `initial`.

Every change is logged and returned by `step`. The whole distillation loss is scaled; per-term
schedules are not supported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from loguru import logger

from samkd.settings import DynamicLambdaSettings


@dataclass(frozen=True)
class WeightChange:
    """One change of `lambda_kd`: at which evaluation (1-based), from what, to what."""

    evaluation: int
    old: float
    new: float
    best_metric: float


class DynamicKDWeight:
    """`lambda_kd(t)` driven by a validation metric (see the module docstring).

    With `settings.enabled` false, `value` stays at `initial` and `step` changes nothing.
    """

    def __init__(self, settings: DynamicLambdaSettings) -> None:
        self.settings = settings
        self.value = settings.initial
        self.best: float | None = None
        self.bad_evaluations = 0
        self.cooldown_left = 0
        self.evaluations = 0

    def improves(self, metric: float) -> bool:
        if not math.isfinite(metric):
            return False
        if self.best is None:
            return True
        if self.settings.resolved_mode == "max":
            return metric > self.best + self.settings.threshold
        return metric < self.best - self.settings.threshold

    def step(self, metric: float) -> WeightChange | None:
        """Account for one evaluation's metric; the change to `lambda_kd`, if any."""
        if not self.settings.enabled:
            return None
        self.evaluations += 1
        improved = self.improves(metric)
        if improved:
            self.best = float(metric)
            self.bad_evaluations = 0
        else:
            self.bad_evaluations += 1
        if self.cooldown_left > 0:
            self.cooldown_left -= 1
            self.bad_evaluations = 0
        if improved:
            return self._raise()
        if self.bad_evaluations <= self.settings.patience:
            return None
        self.bad_evaluations = 0
        self.cooldown_left = self.settings.cooldown
        new = max(self.value * self.settings.factor, self.settings.min_lambda)
        if new >= self.value:
            return None
        return self._change_to(new, "has not improved on")

    def _raise(self) -> WeightChange | None:
        """After an improvement: `lambda_kd * raise_factor`, capped at `initial`."""
        factor = self.settings.raise_factor
        if factor is None:
            return None
        new = min(self.value * factor, self.settings.initial)
        if new <= self.value:
            return None
        return self._change_to(new, "improved to")

    def _change_to(self, new: float, reason: str) -> WeightChange:
        """Set `lambda_kd` to `new` and log why (`reason` joins the metric and its best)."""
        change = WeightChange(
            evaluation=self.evaluations,
            old=self.value,
            new=new,
            best_metric=math.nan if self.best is None else self.best,
        )
        self.value = new
        logger.info(
            "lambda_kd {:.6g} -> {:.6g} at evaluation {}: {} {} {:.6g}",
            change.old,
            change.new,
            change.evaluation,
            self.settings.metric,
            reason,
            change.best_metric,
        )
        return change

    def state_dict(self) -> dict[str, Any]:
        return {
            "value": self.value,
            "best": self.best,
            "bad_evaluations": self.bad_evaluations,
            "cooldown_left": self.cooldown_left,
            "evaluations": self.evaluations,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = {"value", "best", "bad_evaluations", "cooldown_left", "evaluations"} - set(state)
        if missing:
            raise KeyError(f"dynamic weight state lacks {sorted(missing)}")
        self.value = float(state["value"])
        self.best = None if state["best"] is None else float(state["best"])
        self.bad_evaluations = int(state["bad_evaluations"])
        self.cooldown_left = int(state["cooldown_left"])
        self.evaluations = int(state["evaluations"])
