"""Skipping non-finite steps on the device: the fused AdamW's `found_inf`, `optimizer_step`,
the tallies in `Progress`, and whole runs with a NaN injected into one micro-step."""

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch
from torch import nn

from samkd.errors import UsageError
from samkd.train import loop, run_train, step
from samkd.train.metrics_log import read_metrics
from samkd.train.optim import build_optimizer
from samkd.train.progress import NonFiniteLossError, Progress
from samkd.train.state import load_checkpoint
from samkd.train.step import StepTerms

from .conftest import base_assignments, make_settings

NAN = float("nan")


def snapshot(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Parameters and every optimizer state tensor (moments, step counts), copied."""
    state = {f"param/{name}": p.detach().clone() for name, p in model.named_parameters()}
    for index, parameter in enumerate(p for g in optimizer.param_groups for p in g["params"]):
        for key, value in optimizer.state.get(parameter, {}).items():
            state[f"state/{index}/{key}"] = value.clone()
    return state


def same(left: dict[str, torch.Tensor], right: dict[str, torch.Tensor]) -> bool:
    return left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


def changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    return {key for key in before if not torch.equal(before[key], after[key])}


class Tiny(nn.Module):
    """Stands in for a `DistillationStep`: `optimizer_step` reads `.student` and parameters."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.student = nn.Linear(3, 2)

    def backward(self, scaler: torch.amp.GradScaler, bad_gradient: bool) -> None:
        scaler.scale(self.student(torch.ones(4, 3)).square().sum()).backward()
        if bad_gradient:  # as when a finite loss has an infinite derivative
            with torch.no_grad():
                self.student.weight.grad[0, 0] = math.inf  # type: ignore[index]


def step_once(
    model: Tiny,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    skip: float,
    grad_clip: float = 1.0,
    bad_gradient: bool = False,
) -> float:
    """One `optimizer_step` after a backward; the skip flag the update used."""
    settings = make_settings(f"train.grad_clip={grad_clip}")
    model.backward(scaler, bad_gradient)
    flag = step.optimizer_step(model, optimizer, scaler, settings, 0, torch.tensor(skip))  # type: ignore[arg-type]
    return float(flag)


def warm(model: Tiny) -> tuple[torch.optim.AdamW, torch.amp.GradScaler]:
    """A fused AdamW with one update behind it (so that it has state to leave alone)."""
    optimizer = build_optimizer([model], lr=0.1, weight_decay=0.01)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    assert step_once(model, optimizer, scaler, skip=0.0) == 0.0
    return optimizer, scaler


def test_fused_adamw_on_the_cpu_honours_found_inf() -> None:
    model = Tiny()
    optimizer, scaler = warm(model)
    assert all(group["fused"] for group in optimizer.param_groups)
    for found_inf in (1.0, 0.0, 1.0, 0.0):
        model.backward(scaler, bad_gradient=False)
        before = snapshot(model, optimizer)
        optimizer.found_inf = torch.tensor(found_inf)  # type: ignore[attr-defined]
        optimizer.step()
        del optimizer.found_inf  # type: ignore[attr-defined]
        optimizer.zero_grad()
        after = snapshot(model, optimizer)
        # Parameters, moments and step counts all change, or none of them does.
        assert {k.split("/")[-1] for k in before if k.startswith("state/")} == {
            "exp_avg",
            "exp_avg_sq",
            "step",
        }
        assert changed(before, after) == (set() if found_inf else set(before))


@pytest.mark.parametrize("grad_clip", [1.0, 0.0])
def test_optimizer_step_skips_on_the_flag_or_a_nonfinite_gradient(grad_clip: float) -> None:
    model = Tiny()
    optimizer, scaler = warm(model)
    before = snapshot(model, optimizer)
    assert step_once(model, optimizer, scaler, skip=1.0, grad_clip=grad_clip) == 1.0
    assert same(before, snapshot(model, optimizer))
    # A finite loss whose gradient is not: the norm check skips it.
    assert step_once(model, optimizer, scaler, 0.0, grad_clip, bad_gradient=True) == 1.0
    assert same(before, snapshot(model, optimizer))
    assert all(p.grad is None for p in model.parameters())
    assert step_once(model, optimizer, scaler, skip=0.0, grad_clip=grad_clip) == 0.0
    assert not same(before, snapshot(model, optimizer))


def test_optimizer_step_folds_the_flag_into_the_fp16_scaler() -> None:
    model = Tiny()
    optimizer, _ = warm(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)  # GradScaler runs on the CPU too
    before = snapshot(model, optimizer)
    # A NaN loss (the scaler alone would see finite gradients: d(loss + NaN) = d(loss)).
    assert step_once(model, optimizer, scaler, skip=1.0) == 1.0
    assert same(before, snapshot(model, optimizer))
    assert scaler.get_scale() == 512.0  # a skipped step lowers the scale, as an overflow does
    # An overflow is the scaler's own business: skipped, but not counted as a skipped step.
    assert step_once(model, optimizer, scaler, skip=0.0, bad_gradient=True) == 0.0
    assert same(before, snapshot(model, optimizer))
    assert scaler.get_scale() == 256.0
    assert step_once(model, optimizer, scaler, skip=0.0) == 0.0
    assert not same(before, snapshot(model, optimizer))
    assert not hasattr(optimizer, "found_inf")


NAMES = ("a", "task/dice", "loss/total")


def step_terms(*micro_steps: dict[str, float]) -> StepTerms:
    """Micro-steps whose terms are given as sums over one unit each (absent: 0 over 0)."""
    terms = StepTerms()
    for values in micro_steps:
        sums = torch.tensor([values.get(name, 0.0) for name in NAMES])
        terms.add(sums, torch.tensor([float(name in values) for name in NAMES]))
    return terms


def record(progress: Progress, terms: StepTerms, skip: torch.Tensor) -> None:
    assert terms.sums is not None and terms.counts is not None
    progress.record_step(terms.sums, terms.counts, skip)


def test_progress_tallies_keep_skipped_steps_out_of_the_means() -> None:
    progress = Progress(NAMES)
    good = step_terms({"a": 1.0, "loss/total": 2.0}, {"a": 3.0, "loss/total": 4.0})
    bad = step_terms({"a": 5.0, "loss/total": 6.0}, {"a": NAN, "loss/total": NAN})
    masks = step_terms({"a": 1.0, "task/dice": 0.5, "loss/total": 2.0})
    assert float(good.nonfinite()) == 0.0 and float(bad.nonfinite()) == 1.0
    for terms in (good, bad, bad, masks):
        record(progress, terms, terms.nonfinite())
    tallies = progress.read()
    assert tallies.means == {"a": 5 / 3, "task/dice": 0.5, "loss/total": 8 / 3}
    assert tallies.nonfinite_terms == ["a", "loss/total"]
    assert (tallies.skipped_total, tallies.longest_skipped_run) == (2, 2)
    assert int(progress.skipped_run) == 0
    # A gradient-only skip (finite terms) counts too, without naming a term.
    progress.reset_terms()
    record(progress, good, torch.tensor(1.0))
    tallies = progress.read()
    assert tallies.means == dict.fromkeys(NAMES) and tallies.nonfinite_terms == []
    assert (tallies.skipped_total, tallies.longest_skipped_run) == (3, 2)


def test_progress_state_round_trips_exactly(tmp_path: Path) -> None:
    progress = Progress(NAMES, step=7, best_metric=0.5, best_step=4)
    thirds = step_terms({"a": 1 / 3, "loss/total": 0.1}, {"a": 2 / 3, "loss/total": 0.7})
    record(progress, thirds, torch.tensor(0.0))
    record(progress, step_terms({"a": NAN, "loss/total": NAN}), torch.tensor(1.0))
    torch.save(progress.state_dict(), tmp_path / "progress.pt")
    restored = Progress(NAMES)
    restored.load_state_dict(torch.load(tmp_path / "progress.pt", weights_only=True))
    assert restored.state_dict() == progress.state_dict()
    assert restored.read() == progress.read()
    assert torch.equal(restored.term_sums, progress.term_sums)
    with pytest.raises(UsageError, match="the checkpoint logs the terms"):
        Progress(("b",)).load_state_dict(progress.state_dict())


# --------------------------------------------------------------------------- whole runs


def nan_run_settings(tmp_path: Path, shapes: Path, teacher: Path, features: Path, *extra: str):
    return make_settings(
        *base_assignments(shapes, teacher, tmp_path / "run"),
        f"distillation.features={features}",
        "train.grad_accumulation=2",
        *extra,
    )


@contextmanager
def poisoned_steps(steps: set[int], accumulation: int = 2) -> Iterator[list[dict[str, Any]]]:
    """Add NaN to the loss (and so to `loss/total`) and to `kd/t/encoder_mse` of the last
    micro-step of each of `steps` (0-based). The loss's gradient stays finite, so only the
    loss check can skip those steps. Yields every micro-step's terms as (sum, units)."""
    micro_step: Callable[..., Any] = step.micro_step
    seen: list[dict[str, Any]] = []

    def poisoned(parts: step.StepParts, *args: Any) -> Any:
        loss, sums = micro_step(parts, *args)
        names = step.step_module_of(parts.forward).schema.names
        if len(seen) // accumulation in steps and len(seen) % accumulation == accumulation - 1:
            loss = loss + NAN
            sums = sums.clone()
            for name in ("loss/total", "kd/t/encoder_mse"):
                sums[names.index(name)] += NAN
        counts = args[2].tolist()  # micro_step(parts, batch, groups, unit_counts, weights)
        pairs = zip(sums.tolist(), counts, strict=True)
        seen.append(dict(zip(names, pairs, strict=True)))
        return loss, sums

    with mock.patch.object(step, "micro_step", poisoned):
        yield seen


@contextmanager
def step_snapshots() -> Iterator[list[tuple[dict, dict]]]:
    """Parameters and optimizer state before and after every step."""
    train_step: Callable[..., Any] = loop.train_step
    pairs: list[tuple[dict, dict]] = []

    def recorded(parts: step.StepParts, *args: Any) -> None:
        module = step.step_module_of(parts.forward)
        before = snapshot(module, parts.optimizer)
        train_step(parts, *args)
        pairs.append((before, snapshot(module, parts.optimizer)))

    with mock.patch.object(loop, "train_step", recorded):
        yield pairs


def test_a_nan_in_one_micro_step_skips_its_whole_step(
    tmp_path: Path, shapes: Path, teacher_checkpoint: Path, feature_file: Path
) -> None:
    settings = nan_run_settings(
        tmp_path, shapes, teacher_checkpoint, feature_file,
        "train.steps=4", "logging.log_every=2",
    )  # fmt: skip
    with poisoned_steps({1}) as terms, step_snapshots() as snapshots:
        run_train(settings)
    assert [same(before, after) for before, after in snapshots] == [False, True, False, False]
    records = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["skipped_steps"] for r in records] == [1, 1]
    assert records[0]["nonfinite_terms"] == ["kd/t/encoder_mse", "loss/total"]
    assert "nonfinite_terms" not in records[1]
    # The first record's means are those of step 0 alone (its two micro-steps): each term's
    # sum over its units (the step's loss: one value per step).
    for name in ("loss/total", "kd/t/encoder_mse", "task/dice"):
        (first, first_units), (second, second_units) = terms[0][name], terms[1][name]
        assert records[0][name] == pytest.approx((first + second) / (first_units + second_units))
    assert terms[0]["loss/total"][1] == 0 and terms[1]["loss/total"][1] == 1
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert state["progress"]["skipped_total"] == 1


@pytest.mark.parametrize(
    ("poisoned", "aborts"), [({1, 2}, True), ({1, 3}, False)], ids=["in a row", "apart"]
)
def test_consecutive_skipped_steps_abort_at_the_next_log(
    tmp_path: Path,
    shapes: Path,
    teacher_checkpoint: Path,
    feature_file: Path,
    poisoned: set[int],
    aborts: bool,
) -> None:
    settings = nan_run_settings(
        tmp_path, shapes, teacher_checkpoint, feature_file,
        "train.steps=8", "logging.log_every=4", "train.max_nonfinite_steps=2",
    )  # fmt: skip
    with poisoned_steps(poisoned) as terms:
        if aborts:
            with pytest.raises(NonFiniteLossError, match=r"2 consecutive steps.*kd/t/encoder_mse"):
                run_train(settings)
        else:
            run_train(settings)
    # Steps 1 and 2 are noticed at the logging step after them: step 4 is run first.
    assert len(terms) == (4 if aborts else 8) * 2
    records = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "train"]
    assert records[0]["step"] == 4 and records[0]["skipped_steps"] == 2


def test_ranks_reduce_gradients_in_the_last_micro_step_only(
    tmp_path: Path, shapes: Path, teacher_checkpoint: Path, feature_file: Path
) -> None:
    entered: list[int] = []

    class Recorder:
        """Stands in for the DDP wrapper: counts the micro-steps run under `no_sync`."""

        @contextmanager
        def no_sync(self) -> Iterator[None]:
            entered.append(1)
            yield

    original = loop.StepParts

    def with_recorder(forward: Any, ddp: Any, *rest: Any) -> step.StepParts:
        return original(forward, Recorder(), *rest)

    settings = nan_run_settings(
        tmp_path, shapes, teacher_checkpoint, feature_file,
        "train.grad_accumulation=2", "train.steps=3",
    )  # fmt: skip
    with mock.patch.object(loop, "StepParts", with_recorder):
        run_train(settings)
    assert len(entered) == 3  # one micro-step of each step's two
