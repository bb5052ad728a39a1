from __future__ import annotations

import pytest
from loguru import logger

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
