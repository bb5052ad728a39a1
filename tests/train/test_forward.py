"""The sync-free prompt encoding gives exactly what SAM's `PromptEncoder` gives; the objects of
a batch decode in one call as SAM's decoder decodes each image's."""

from pathlib import Path

import pytest
import torch

from samkd.models import build_sam
from samkd.train import setup
from samkd.train.batches import DistillationDataset, collate_training
from samkd.train.forward import PromptGroup, encode_prompts, prompt_groups, run_decoder

from .conftest import STUDENT, TEACHER, make_settings


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
        torch.zeros(4, dtype=torch.int64),
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
    zeros = torch.zeros(3, dtype=torch.int64)
    group = PromptGroup(
        zeros, torch.arange(3), point_coords=torch.zeros(3, 2, 2), point_labels=labels
    )
    assert group.ambiguous().tolist() == [True, False, False]
    boxed = PromptGroup(zeros[:2], torch.arange(2), boxes=torch.zeros(2, 4))
    assert boxed.ambiguous().tolist() == [False, False]


@pytest.mark.parametrize("model_type", [STUDENT, TEACHER])
def test_a_batch_decodes_as_sam_decodes_each_image(shapes: Path, model_type: str) -> None:
    """Boxes, single clicks and several points over four images, in one call per kind: the
    masks and IoUs of `MaskDecoder.predict_masks` called image by image, prompt kind by
    prompt kind, in the same order of objects."""
    settings = make_settings(
        f"data.train={shapes}",
        f"student.model_type={model_type}",
        "data.image_size=64",
        "data.prompts.mode=mixed",
        "data.prompts.max_points=2",
        "data.prompts.num_negative_points=1",
    )
    torch.manual_seed(0)
    sam = setup.build_student(settings, torch.device("cpu"))
    dataset = DistillationDataset(
        setup.build_train_dataset(settings), None, setup.Augmentation(), 0
    )
    batch = collate_training([dataset[index] for index in range(4)])
    groups = prompt_groups(batch, torch.device("cpu"))
    assert {len(group.images.unique()) for group in groups} != {1}  # images share calls
    with torch.no_grad():
        embeddings = sam.image_encoder(batch.images)
        decoded = run_decoder(sam.prompt_encoder, sam.mask_decoder, embeddings, groups, False)
        expected_logits, expected_iou = {}, {}
        for group in groups:
            for image in group.images.unique().tolist():
                chosen = group.images == image
                part = PromptGroup(
                    group.images[chosen],
                    group.objects[chosen],
                    boxes=None if group.boxes is None else group.boxes[chosen],
                    point_coords=None if group.point_coords is None else group.point_coords[chosen],
                    point_labels=None if group.point_labels is None else group.point_labels[chosen],
                )
                sparse, dense = encode_prompts(sam.prompt_encoder, part)
                logits, iou = sam.mask_decoder.predict_masks(
                    embeddings[image : image + 1], sam.prompt_encoder.get_dense_pe(), sparse, dense
                )
                for position, logit, score in zip(part.objects.tolist(), logits, iou, strict=True):
                    expected_logits[position], expected_iou[position] = logit, score
    order = torch.cat([group.objects for group in groups]).tolist()
    assert sorted(order) == list(range(sum(len(i.sample.prompt_kinds) for i in batch.samples)))
    torch.testing.assert_close(
        decoded.mask_logits, torch.stack([expected_logits[p] for p in order]), rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(
        decoded.iou, torch.stack([expected_iou[p] for p in order]), rtol=1e-5, atol=1e-5
    )
