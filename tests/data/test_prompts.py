from __future__ import annotations

import numpy as np
import pytest

from samkd.data import (
    PromptSampler,
    distance_transform,
    farthest_from_boundary_point,
    select_objects,
)
from samkd.data.masks import mask_box

from .conftest import object_masks


def masks_array(height: int = 40, width: int = 60) -> np.ndarray:
    return np.stack(object_masks(height, width))


def brute_force_distance(mask: np.ndarray) -> np.ndarray:
    padded = np.pad(mask, 1)
    background = np.argwhere(~padded)
    distance = np.zeros(mask.shape)
    for row, column in np.argwhere(mask):
        offsets = background - (row + 1, column + 1)
        distance[row, column] = np.sqrt((offsets**2).sum(axis=1).min())
    return distance


def test_unjittered_boxes_are_tight_and_contain_the_mask() -> None:
    masks = masks_array()
    prompts = PromptSampler(mode="box", box_jitter=0.0).sample(masks, seed=0, index=0)
    for mask, box in zip(masks, prompts.boxes, strict=True):
        rows, columns = np.nonzero(mask)
        assert box.tolist() == [columns.min(), rows.min(), columns.max(), rows.max()]
    assert prompts.kinds == ("box", "box", "box")
    assert prompts.point_coords.shape == (3, 0, 2)


def test_jittered_boxes_stay_near_the_mask_and_inside_the_image() -> None:
    masks = masks_array()
    sampler = PromptSampler(mode="box", box_jitter=0.2)
    for index in range(20):
        prompts = sampler.sample(masks, seed=1, index=index)
        for mask, box in zip(masks, prompts.boxes, strict=True):
            tight = mask_box(mask)
            sides = np.maximum(tight[2:] - tight[:2], 1.0)
            limit = np.concatenate([sides, sides]) * 0.2 + 1e-9
            assert np.all(np.abs(box - tight) <= limit)
            assert 0 <= box[0] <= box[2] <= 59 and 0 <= box[1] <= box[3] <= 39


def test_points_are_inside_and_negatives_outside_the_mask() -> None:
    masks = masks_array()
    sampler = PromptSampler(mode="points", min_positive=1, max_positive=3, num_negative=2)
    for index in range(20):
        prompts = sampler.sample(masks, seed=0, index=index)
        assert prompts.point_coords.shape == (3, 5, 2)
        for mask, box, coords, labels in zip(
            masks, prompts.boxes, prompts.point_coords, prompts.point_labels, strict=True
        ):
            positives = coords[labels == 1].astype(int)
            negatives = coords[labels == 0].astype(int)
            assert 1 <= len(positives) <= 3
            # One positive point is a single click: no negatives.
            assert len(negatives) == (0 if len(positives) == 1 else 2)
            assert mask[positives[:, 1], positives[:, 0]].all()
            assert not mask[negatives[:, 1], negatives[:, 0]].any()
            inside_box = (
                (negatives[:, 0] >= round(box[0])) & (negatives[:, 0] <= round(box[2]))
                & (negatives[:, 1] >= round(box[1])) & (negatives[:, 1] <= round(box[3]))
            )  # fmt: skip
            # The one-pixel bar fills its box; its negatives fall back to the whole image.
            if not mask[round(box[1]) : round(box[3]) + 1, round(box[0]) : round(box[2]) + 1].all():
                assert inside_box.all()
            # Padding follows the real points.
            assert list(labels) == sorted(labels, key=lambda v: {1: 0, 0: 1, -1: 2}[v])


def test_single_clicks_are_drawn_with_negatives_on() -> None:
    """With negative points asked for, a third of the point prompts (one positive of 1-3) are
    still one labelled point alone: the prompts that train SAM's multimask outputs."""
    masks = masks_array()
    sampler = PromptSampler(mode="points", max_positive=3, num_negative=1)
    counts = [
        int((labels >= 0).sum())
        for index in range(60)
        for labels in sampler.sample(masks, seed=0, index=index).point_labels
    ]
    assert set(counts) == {1, 3, 4}
    assert 0.2 < counts.count(1) / len(counts) < 0.5
    with pytest.raises(ValueError, match="single click"):
        PromptSampler(mode="points", max_positive=1, num_negative=1)


def test_prompts_depend_only_on_seed_and_index() -> None:
    masks = masks_array()
    sampler = PromptSampler(mode="mixed", max_positive=3, num_negative=1)
    first = sampler.sample(masks, seed=5, index=7)
    again = sampler.sample(masks, seed=5, index=7)
    np.testing.assert_array_equal(first.boxes, again.boxes)
    np.testing.assert_array_equal(first.point_coords, again.point_coords)
    np.testing.assert_array_equal(first.point_labels, again.point_labels)
    assert first.kinds == again.kinds
    other_index = sampler.sample(masks, seed=5, index=8)
    other_seed = sampler.sample(masks, seed=6, index=7)
    assert not np.array_equal(first.boxes, other_index.boxes)
    assert not np.array_equal(first.boxes, other_seed.boxes)


def test_mixed_mode_gives_both_kinds() -> None:
    masks = masks_array()
    sampler = PromptSampler(mode="mixed", box_probability=0.5)
    samples = [sampler.sample(masks, seed=0, index=index) for index in range(10)]
    kinds = {kind for prompts in samples for kind in prompts.kinds}
    assert kinds == {"box", "points"}
    prompts = sampler.sample(masks, seed=0, index=0)
    for kind, labels in zip(prompts.kinds, prompts.point_labels, strict=True):
        assert (labels == -1).all() == (kind == "box")


def test_no_masks_gives_empty_prompts() -> None:
    prompts = PromptSampler(max_positive=2).sample(np.zeros((0, 5, 5), bool), seed=0, index=0)
    assert prompts.boxes.shape == (0, 4) and prompts.point_coords.shape == (0, 2, 2)


def test_select_objects() -> None:
    assert select_objects(3, None, seed=0, index=0).tolist() == [0, 1, 2]
    assert select_objects(3, 5, seed=0, index=0).tolist() == [0, 1, 2]
    chosen = select_objects(100, 10, seed=0, index=0)
    assert len(chosen) == 10 and len(set(chosen.tolist())) == 10
    assert chosen.tolist() == sorted(chosen.tolist())
    assert chosen.tolist() == select_objects(100, 10, seed=0, index=0).tolist()
    assert chosen.tolist() != select_objects(100, 10, seed=0, index=1).tolist()


def test_invalid_sampler_settings() -> None:
    with pytest.raises(ValueError):
        PromptSampler(min_positive=2, max_positive=1)
    with pytest.raises(ValueError):
        PromptSampler(mode="scribble")  # type: ignore[arg-type]


def test_distance_transform_is_exact() -> None:
    rng = np.random.default_rng(0)
    for _ in range(10):
        height, width = rng.integers(1, 20, size=2)
        mask = rng.random((height, width)) < rng.random()
        np.testing.assert_allclose(distance_transform(mask), brute_force_distance(mask))


def test_farthest_point_is_inside_and_maximal() -> None:
    for mask in [*object_masks(40, 60), np.pad(np.ones((9, 5), bool), ((3, 1), (2, 7)))]:
        x, y = farthest_from_boundary_point(mask)
        assert mask[y, x]
        distance = brute_force_distance(mask)
        assert distance[y, x] == pytest.approx(distance.max())
    rows, columns = np.mgrid[:31, :41]
    disc = (rows - 15) ** 2 + (columns - 20) ** 2 <= 100
    assert farthest_from_boundary_point(disc) == (20, 15)
    with pytest.raises(ValueError):
        farthest_from_boundary_point(np.zeros((4, 4), bool))
