"""Evaluation prompts: boxes, centre points and corrective clicks."""

import numpy as np
import torch

from samkd.evaluate.prompts import add_clicks, box_prompts, center_point_prompts, next_click


def rectangle(height: int, width: int, top: int, left: int, bottom: int, right: int) -> np.ndarray:
    mask = np.zeros((height, width), dtype=bool)
    mask[top:bottom, left:right] = True
    return mask


def test_box_is_inclusive_extent() -> None:
    mask = torch.from_numpy(rectangle(20, 30, 2, 5, 9, 12))
    assert box_prompts(mask[None]).boxes.tolist() == [[5.0, 2.0, 11.0, 8.0]]


def test_center_point_lies_inside_and_deepest() -> None:
    ring = rectangle(40, 40, 5, 5, 35, 35) & ~rectangle(40, 40, 12, 12, 28, 28)
    prompts = center_point_prompts(torch.from_numpy(ring)[None])
    x, y = (int(v) for v in prompts.point_coords[0, 0])
    assert ring[y, x]
    assert prompts.point_labels.tolist() == [[1.0]]
    # the deepest pixels of a ring of width 7 are 3-4 pixels from both edges
    assert min(abs(x - 5), abs(x - 34), abs(y - 5), abs(y - 34)) >= 3


def test_next_click_fixes_the_larger_error() -> None:
    target = rectangle(40, 40, 0, 0, 40, 20)
    too_small = rectangle(40, 40, 0, 0, 40, 5)
    x, y, label = next_click(too_small, target)
    assert label == 1 and target[y, x] and not too_small[y, x]
    too_big = rectangle(40, 40, 0, 0, 40, 38)
    x, y, label = next_click(too_big, target)
    assert label == 0 and too_big[y, x] and not target[y, x]


def test_add_clicks_appends_one_point_per_object() -> None:
    targets = torch.from_numpy(np.stack([rectangle(16, 16, 0, 0, 8, 8)] * 2))
    prompts = add_clicks(center_point_prompts(targets), torch.zeros_like(targets), targets)
    assert prompts.point_coords.shape == (2, 2, 2)
    assert prompts.point_labels.tolist() == [[1.0, 1.0], [1.0, 1.0]]
