from __future__ import annotations

import pytest
from loguru import logger
from pydantic import ValidationError

from samkd.distill.dynamic_weight import DynamicKDWeight
from samkd.settings import DynamicLambdaSettings

SETTINGS = DynamicLambdaSettings(
    enabled=True,
    initial=1.0,
    factor=0.5,
    patience=2,
    threshold=0.01,
    cooldown=1,
    min_lambda=0.2,
    mode="max",
)
# fmt: off
TRACE = [0.5, 0.6, 0.605, 0.6, 0.59, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7]
VALUES = [1, 1, 1, 1, 0.5, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25, 0.25, 0.2, 0.2, 0.2, 0.2, 0.2]
# fmt: on
CHANGES = {5: (1.0, 0.5), 9: (0.5, 0.25), 13: (0.25, 0.2)}


def run(weight: DynamicKDWeight, metrics: list[float], first: int = 1) -> list[float]:
    values = []
    for evaluation, metric in enumerate(metrics, start=first):
        change = weight.step(metric)
        if evaluation in CHANGES:
            assert change is not None
            assert (change.evaluation, change.old, change.new) == (evaluation, *CHANGES[evaluation])
        else:
            assert change is None
        values.append(weight.value)
    return values


def test_follows_a_scripted_trace_and_logs_each_change():
    messages: list[str] = []
    sink = logger.add(messages.append, format="{message}")
    try:
        assert run(DynamicKDWeight(SETTINGS), TRACE) == VALUES
    finally:
        logger.remove(sink)
    assert len(messages) == len(CHANGES)
    assert "lambda_kd 1 -> 0.5 at evaluation 5" in messages[0]


def test_survives_a_state_dict_round_trip():
    first = DynamicKDWeight(SETTINGS)
    assert run(first, TRACE[:7]) == VALUES[:7]
    resumed = DynamicKDWeight(SETTINGS)
    resumed.load_state_dict(first.state_dict())
    assert run(resumed, TRACE[7:], first=8) == VALUES[7:]


def test_min_mode_and_non_finite_metrics():
    weight = DynamicKDWeight(
        DynamicLambdaSettings(enabled=True, initial=2.0, patience=0, threshold=0.0, mode="min")
    )
    assert weight.step(1.0) is None
    assert weight.step(0.5) is None
    change = weight.step(float("nan"))
    assert change is not None and change.new == pytest.approx(1.0)
    assert weight.step(0.4) is None


def test_disabled_weight_stays_at_initial():
    weight = DynamicKDWeight(DynamicLambdaSettings(enabled=False, initial=0.7, patience=0))
    assert all(weight.step(0.0) is None for _ in range(5))
    assert weight.value == 0.7


RAISING = DynamicLambdaSettings(
    enabled=True, initial=1.0, factor=0.5, patience=0, threshold=0.0, mode="max", raise_factor=3
)
# Two plateaus lower lambda_kd to 0.25; each improvement then triples it, up to initial.
RAISING_TRACE = [0.5, 0.4, 0.3, 0.6, 0.7, 0.8, 0.8]
RAISED_VALUES = [1.0, 0.5, 0.25, 0.75, 1.0, 1.0, 0.5]


def values(weight: DynamicKDWeight, metrics: list[float]) -> list[float]:
    """`lambda_kd` after each evaluation."""
    trace = []
    for metric in metrics:
        weight.step(metric)
        trace.append(weight.value)
    return trace


def test_improvements_raise_lambda_up_to_its_initial_value():
    messages: list[str] = []
    sink = logger.add(messages.append, format="{message}")
    try:
        assert values(DynamicKDWeight(RAISING), RAISING_TRACE) == RAISED_VALUES
    finally:
        logger.remove(sink)
    assert "lambda_kd 0.25 -> 0.75 at evaluation 4: val/miou improved to 0.6" in messages[2]
    assert len(messages) == 5  # two lowerings, two raises, one more lowering


def test_without_raise_factor_lambda_is_only_lowered():
    settings = RAISING.model_copy(update={"raise_factor": None})
    assert values(DynamicKDWeight(settings), RAISING_TRACE) == [
        1.0,
        0.5,
        0.25,
        0.25,
        0.25,
        0.25,
        0.125,
    ]


def test_raising_survives_a_state_dict_round_trip():
    first = DynamicKDWeight(RAISING)
    assert values(first, RAISING_TRACE[:3]) == RAISED_VALUES[:3]
    resumed = DynamicKDWeight(RAISING)
    resumed.load_state_dict(first.state_dict())
    assert values(resumed, RAISING_TRACE[3:]) == RAISED_VALUES[3:]


@pytest.mark.parametrize("raise_factor", [1.0, 0.5, -2.0])
def test_a_raise_factor_that_does_not_raise_is_refused(raise_factor: float):
    with pytest.raises(ValidationError, match="greater than 1"):
        DynamicLambdaSettings(raise_factor=raise_factor)
