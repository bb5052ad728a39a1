"""The corrective-click sampler of the prompt loop: where clicks go, padding, determinism,
exact distances, and device-only work."""

import numpy as np
import pytest
import torch

from samkd.data import distance_transform
from samkd.train.clicks import distance_to_border, hash_uniform, sample_clicks

from .syncs import detect_syncs

MODES = ["farthest", "random"]


def square(size: int, top: int, left: int, side: int) -> torch.Tensor:
    mask = torch.zeros(size, size, dtype=torch.bool)
    mask[top : top + side, left : left + side] = True
    return mask


def shifted_squares(count: int, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted and target masks `count x size x size` that overlap partly, with both false
    negatives and false positives, in random places."""
    generator = torch.Generator().manual_seed(0)
    predicted, target = [], []
    for _ in range(count):
        top, left, side = torch.randint(2, 12, (3,), generator=generator).tolist()
        shift_y, shift_x = torch.randint(-4, 5, (2,), generator=generator).tolist()
        target.append(square(size, top + 4, left + 4, side + 4))
        predicted.append(square(size, top + 4 + shift_y, left + 4 + shift_x, side + 4))
    return torch.stack(predicted), torch.stack(target)


@pytest.mark.parametrize("mode", MODES)
def test_positives_go_to_missed_pixels_and_negatives_to_extra_ones(mode: str) -> None:
    predicted, target = shifted_squares(64)
    # Grow some predictions so that both kinds of error win somewhere.
    predicted[::3] |= torch.roll(predicted[::3], 3, dims=1)
    clicks = sample_clicks(predicted, target, mode, seed=5)  # type: ignore[arg-type]
    labels = clicks.labels.tolist()
    assert {0, 1} <= set(labels)
    coords = clicks.coords.long().tolist()
    for index, ((x, y), label) in enumerate(zip(coords, labels, strict=True)):
        missed = bool(target[index, y, x] and not predicted[index, y, x])
        extra = bool(predicted[index, y, x] and not target[index, y, x])
        wrong = (predicted[index] ^ target[index]).any()
        assert label == (1 if missed else 0 if extra else -1), (index, label)
        assert bool(wrong) == (label != -1)


@pytest.mark.parametrize(("kind", "label"), [("missed", 1), ("extra", 0)])
def test_farthest_click_is_the_centre_of_a_square_error(kind: str, label: int) -> None:
    region = square(48, 20, 30, 9)  # centre (x 34, y 24)
    empty = torch.zeros_like(region)
    predicted, target = (empty, region) if kind == "missed" else (region, empty)
    clicks = sample_clicks(predicted[None], target[None], "farthest")
    assert clicks.coords.tolist() == [[34.0, 24.0]]
    assert clicks.labels.tolist() == [label]


def test_the_deeper_error_region_wins() -> None:
    target = square(48, 2, 2, 20)
    predicted = target.clone()
    predicted[2:22, 2:8] = False  # a strip of 20 x 6 missed: depth 3
    predicted |= square(48, 30, 30, 11)  # an extra square of 11 x 11: depth 6
    clicks = sample_clicks(predicted[None], target[None], "farthest")
    assert clicks.labels.tolist() == [0]
    assert clicks.coords.tolist() == [[35.0, 35.0]]


@pytest.mark.parametrize("mode", MODES)
def test_no_error_gives_a_padding_point(mode: str) -> None:
    masks = torch.stack([square(16, 2, 3, 5), torch.zeros(16, 16, dtype=torch.bool)])
    clicks = sample_clicks(masks, masks.clone(), mode)  # type: ignore[arg-type]
    assert clicks.labels.tolist() == [-1, -1]
    assert clicks.coords.tolist() == [[0.0, 0.0], [0.0, 0.0]]


@pytest.mark.parametrize("mode", MODES)
def test_clicks_stay_in_the_valid_region(mode: str) -> None:
    predicted = torch.zeros(1, 32, 32, dtype=torch.bool)
    target = square(32, 10, 10, 20)[None]
    valid = torch.zeros_like(target)
    valid[:, :20, :20] = True
    clicks = sample_clicks(predicted, target, mode, valid=valid)  # type: ignore[arg-type]
    x, y = clicks.coords[0].long().tolist()
    assert clicks.labels.tolist() == [1] and x < 20 and y < 20
    nothing = sample_clicks(predicted, target, mode, valid=torch.zeros_like(valid))  # type: ignore[arg-type]
    assert nothing.labels.tolist() == [-1]


def test_random_clicks_depend_on_the_seed_only() -> None:
    predicted, target = shifted_squares(16)
    first = sample_clicks(predicted, target, "random", seed=3)
    again = sample_clicks(predicted.clone(), target.clone(), "random", seed=3)
    other = sample_clicks(predicted, target, "random", seed=4)
    assert torch.equal(first.coords, again.coords) and torch.equal(first.labels, again.labels)
    assert not torch.equal(first.coords, other.coords)


def test_hash_noise_is_fixed_and_roughly_uniform() -> None:
    values = hash_uniform(torch.arange(100_000))
    assert values.min() >= 0 and values.max() < 1
    assert abs(float(values.mean()) - 0.5) < 0.01
    # Only a key's low 32 bits count.
    assert torch.equal(hash_uniform(torch.tensor([2**40 + 1])), hash_uniform(torch.tensor([1])))


def test_distances_are_exact_euclidean() -> None:
    generator = np.random.default_rng(0)
    masks = generator.random((6, 23, 17)) < 0.8
    masks[0] = True  # all inside: measured to the grid's edges
    masks[1] = False
    expected = np.stack([distance_transform(mask) for mask in masks])
    computed = distance_to_border(torch.from_numpy(masks)).numpy()
    np.testing.assert_allclose(computed, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_sampling_runs_on_the_device_without_syncs(mode: str) -> None:
    predicted, target = shifted_squares(4)
    meta = torch.device("meta")
    on_meta = predicted.to(meta), target.to(meta)
    with detect_syncs() as found:
        clicks = sample_clicks(*on_meta, mode, seed=1)  # type: ignore[arg-type]
        sample_clicks(predicted, target, mode, seed=1)  # type: ignore[arg-type]
    assert found == []
    assert clicks.coords.device == meta and clicks.labels.device == meta
    assert clicks.coords.shape == (4, 2) and clicks.labels.shape == (4,)
