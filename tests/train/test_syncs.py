"""Training steps never make the host wait for the device (see `syncs.py` for the detector)."""

from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch

from samkd.train import loop, run_train
from samkd.train.forward import PromptGroup

from .conftest import ALL_TERMS, base_assignments, make_settings
from .syncs import detect_syncs

# Both prompt kinds (several points, single points: ambiguous objects), accumulation.
STEP_ASSIGNMENTS = [
    "data.prompts.mode=mixed",
    "data.prompts.max_points=2",
    "data.prompts.num_negative_points=1",
    "train.grad_accumulation=2",
    "train.steps=3",
    "logging.log_every=100",  # no logging step: those read the tallies back on purpose
]


def old_all_finite(loss: torch.Tensor) -> bool:
    """How the loop used to check each micro-step's loss."""
    return bool(torch.isfinite(loss.detach()).float())


@pytest.mark.parametrize(
    "operation",
    [
        lambda x: x.sum().item(),
        lambda x: old_all_finite(x.sum()),
        lambda x: float(x.max()),
        lambda x: x.tolist(),
        lambda x: x.cpu(),
        lambda x: x.to("cpu"),
        lambda x: x.nonzero(),
        lambda x: x[x > 0],
        lambda x: x.masked_select(x > 0),
        lambda x: torch.equal(x, x),
        lambda x: torch.tensor([1.0, 2.0], device=x.device),
        lambda x: PromptGroup(0, torch.arange(2), point_labels=x).ambiguous().cpu(),
    ],
    ids=[
        "item", "bool", "float", "tolist", "cpu", "to", "nonzero", "mask", "masked_select",
        "equal", "tensor", "old ambiguous",
    ],
)  # fmt: skip
def test_detector_catches_syncs(operation: Callable[[torch.Tensor], Any]) -> None:
    with detect_syncs() as found:
        operation(torch.randn(2, 3))
    assert found


def test_detector_passes_device_only_work() -> None:
    x = torch.randn(4, 3)
    with detect_syncs() as found:
        y = torch.where(x > 0, x, 0.0).sum(0) + x.to(torch.float64).mean()
        x.to(x.device, non_blocking=True)
        x[torch.tensor([0, 2])]
        (~torch.isfinite(y)).any().float()
    assert found == []


def steps_with_syncs(settings: Any) -> list[list[str]]:
    """Train, recording the syncing operations of every `train_step` call."""
    found_per_step: list[list[str]] = []
    train_step = loop.train_step

    def detected(*args: Any) -> None:
        with detect_syncs() as found:
            train_step(*args)
        found_per_step.append(found)

    with mock.patch.object(loop, "train_step", detected):
        run_train(settings)
    return found_per_step


def test_precomputed_steps_do_not_sync(
    tmp_path: Path, shapes: Path, teacher_checkpoint: Path, feature_file: Path
) -> None:
    settings = make_settings(
        *base_assignments(shapes, teacher_checkpoint, tmp_path / "run"),
        *ALL_TERMS,
        *STEP_ASSIGNMENTS,
        f"distillation.features={feature_file}",
        "distillation.rkd.patches=sample",
    )
    found = steps_with_syncs(settings)
    assert len(found) == 3
    assert found == [[], [], []]


def test_online_steps_do_not_sync(tmp_path: Path, shapes: Path, teacher_checkpoint: Path) -> None:
    settings = make_settings(
        *base_assignments(shapes, teacher_checkpoint, tmp_path / "run"),
        *ALL_TERMS,
        *STEP_ASSIGNMENTS,
        "distillation.use_precomputed_features=false",
        "train.augment.brightness=0.1",  # online teachers get their own inputs
        "train.grad_clip=0",  # the gradient norm is then computed only to check it
        "distillation.fast_teachers=on",
    )
    found = steps_with_syncs(settings)
    assert len(found) == 3
    assert found == [[], [], []]
