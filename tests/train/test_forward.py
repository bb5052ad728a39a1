"""The sync-free prompt encoding gives exactly what SAM's `PromptEncoder` gives."""

import pytest
import torch

from samkd.models import build_sam
from samkd.train.forward import PromptGroup, encode_prompts

from .conftest import STUDENT


@pytest.mark.parametrize("kinds", [("points",), ("boxes",), ("points", "boxes")])
@pytest.mark.parametrize("label_dtype", [torch.int64, torch.float32])
def test_encode_prompts_equals_sams_prompt_encoder(
    kinds: tuple[str, ...], label_dtype: torch.dtype
) -> None:
    torch.manual_seed(0)
    prompt_encoder = build_sam(STUDENT).prompt_encoder
    coords = torch.rand(4, 3, 2) * 200
    labels = torch.tensor([[1, -1, -1], [1, 0, -1], [0, 1, 1], [1, 1, 0]], dtype=label_dtype)
    boxes = torch.rand(4, 4) * 200
    points = (coords, labels) if "points" in kinds else None
    box_prompts = boxes if "boxes" in kinds else None
    group = PromptGroup(
        0,
        torch.arange(4),
        boxes=box_prompts,
        point_coords=coords if points else None,
        point_labels=labels if points else None,
    )
    sparse, dense = encode_prompts(prompt_encoder, group)
    expected_sparse, expected_dense = prompt_encoder(points=points, boxes=box_prompts, masks=None)
    assert torch.equal(sparse, expected_sparse)
    assert torch.equal(dense, expected_dense)


def test_ambiguous_objects_are_single_points() -> None:
    labels = torch.tensor([[1, -1], [1, 0], [1, 1]])
    group = PromptGroup(0, torch.arange(3), point_coords=torch.zeros(3, 2, 2), point_labels=labels)
    assert group.ambiguous().tolist() == [True, False, False]
    boxed = PromptGroup(0, torch.arange(2), boxes=torch.zeros(2, 4))
    assert boxed.ambiguous().tolist() == [False, False]
