"""Label-free decoder distillation (`data.prompts.unlabelled`): grid points and teacher masks
prompt the images without masks, with the right task-loss weights and unit counts; the same
terms precomputed and online; the step on the `meta` device."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from samkd.errors import UsageError
from samkd.features import FeatureStore
from samkd.runtime import Distributed
from samkd.settings import SettingsError
from samkd.train import run_train, setup
from samkd.train.batches import DistillationDataset, collate_training
from samkd.train.forward import group_task_weights, prompt_groups
from samkd.train.label_free import LabelFree, grid_points
from samkd.train.step import micro_step
from samkd.train.task_loss import sam_task_loss
from samkd.train.teacher_masks import PSEUDO_MASK_CACHE
from samkd.train.terms import UnitCounts

from .conftest import KEEP_ALL_MASKS, base_assignments, make_settings
from .test_conditions import image_ids, meta_parts, partly_labelled, train_records

ONLINE_DECODER = [
    "distillation.use_precomputed_features=false",
    "distillation.decoder.enabled=true",
    "data.image_size=128",
]


def test_grid_points_fall_one_per_cell_inside_the_image() -> None:
    points = grid_points((60, 100), 7, np.random.default_rng(0))
    assert points.shape == (7, 2)
    assert (points >= 0).all() and (points[:, 0] <= 99).all() and (points[:, 1] <= 59).all()
    cells = {(int(x * 3 // 100), int(y * 3 // 60)) for x, y in points}
    assert len(cells) == 7  # a 3 x 3 grid, seven distinct cells
    assert np.array_equal(points, grid_points((60, 100), 7, np.random.default_rng(0)))


def test_task_loss_weights_leave_out_and_scale_objects() -> None:
    torch.manual_seed(0)
    logits, iou = torch.randn(3, 4, 8, 8), torch.rand(3, 4)
    targets = (torch.rand(3, 8, 8) > 0.5).float()
    plain = sam_task_loss(logits, iou, targets)
    ones = sam_task_loss(logits, iou, targets, weights=torch.ones(3))
    first_two = sam_task_loss(logits[:2], iou[:2], targets[:2])
    without_third = sam_task_loss(logits, iou, targets, weights=torch.tensor([1.0, 1.0, 0.0]))
    halved = sam_task_loss(logits, iou, targets, weights=torch.full((3,), 0.5))
    for name, value in plain.items():
        torch.testing.assert_close(ones[name], value)
        torch.testing.assert_close(without_third[name], first_two[name])
        torch.testing.assert_close(halved[name], value / 2)


def partly_labelled_dataset(
    tmp_path: Path, shapes: Path, teacher: Path, label_free: LabelFree
) -> tuple[DistillationDataset, str]:
    """Online settings over a copy of `shapes` whose first image has no masks."""
    unlabelled = image_ids(shapes)[0]
    data = partly_labelled(shapes, tmp_path / "data", [unlabelled])
    settings = make_settings(*base_assignments(data, teacher, tmp_path / "run"), *ONLINE_DECODER)
    images = setup.build_train_dataset(settings)
    return DistillationDataset(images, None, setup.Augmentation(), 0, label_free), unlabelled


def test_points_prompt_only_the_images_without_masks(
    tmp_path: Path, shapes: Path, teacher_checkpoint: Path
) -> None:
    dataset, unlabelled = partly_labelled_dataset(
        tmp_path, shapes, teacher_checkpoint, LabelFree("points", num_points=5)
    )
    items = [dataset[i] for i in range(len(dataset))]
    (free,) = [item for item in items if item.sample.image_id == unlabelled]
    assert free.sample.prompt_kinds == ("points",) * 5
    assert free.sample.point_labels is not None and free.sample.point_coords is not None
    assert free.sample.point_labels.tolist() == [[1]] * 5
    height, width = free.sample.input_size
    assert (free.sample.point_coords[..., 0] < width).all()
    assert (free.sample.point_coords[..., 1] < height).all()
    assert free.task_weights is not None and free.task_weights.tolist() == [0.0] * 5
    assert free.low_res_targets.shape == (5, 32, 32) and not free.low_res_targets.any()
    labelled = [item for item in items if item.sample.image_id != unlabelled]
    assert all(item.task_weights is None and item.sample.prompt_kinds for item in labelled)
    batch = collate_training([free, labelled[0]])
    assert batch.num_targets() == len(labelled[0].sample.prompt_kinds)


def rectangle_rle(size: tuple[int, int], box: tuple[int, int, int, int]) -> dict:
    mask = np.zeros(size, dtype=np.uint8)
    x0, y0, x1, y1 = box
    mask[y0 : y1 + 1, x0 : x1 + 1] = 1
    rle = mask_utils.encode(np.asfortranarray(mask))
    return {"size": list(size), "counts": rle["counts"].decode()}


def test_teacher_masks_become_the_objects_of_an_image_without_masks(
    tmp_path: Path, shapes: Path, teacher_checkpoint: Path
) -> None:
    size = (96, 128)  # the shapes' images
    boxes = [(10, 20, 40, 50), (60, 5, 120, 30)]
    empty = mask_utils.encode(np.zeros((*size, 1), dtype=np.uint8, order="F"))[0]
    empty = {"size": list(size), "counts": empty["counts"].decode()}  # left out
    masks = {
        image_id: [rectangle_rle(size, boxes[0]), empty, rectangle_rle(size, boxes[1])]
        for image_id in image_ids(shapes)
    }
    label_free = LabelFree("teacher_masks", pseudo_mask_weight=0.25, pseudo_masks=masks.__getitem__)
    dataset, unlabelled = partly_labelled_dataset(tmp_path, shapes, teacher_checkpoint, label_free)
    index = [record.image_id for record in dataset.dataset.records].index(unlabelled)
    item = dataset[index]
    assert item.sample.masks.shape == (2, *size)
    assert item.sample.boxes.tolist() == [list(map(float, box)) for box in boxes]
    assert item.task_weights is not None and item.task_weights.tolist() == [0.25, 0.25]
    assert item.low_res_targets.shape == (2, 32, 32) and item.low_res_targets.sum() > 0
    assert item.sample.prompt_boxes is not None and item.sample.prompt_boxes.shape == (2, 4)


def test_the_label_free_step_counts_targets_and_objects_apart_on_the_meta_device(
    tmp_path: Path, shapes: Path, teacher_checkpoint: Path
) -> None:
    unlabelled = image_ids(shapes)[0]
    data = partly_labelled(shapes, tmp_path / "data", [unlabelled])
    settings = make_settings(
        *base_assignments(data, teacher_checkpoint, tmp_path / "run"),
        "distillation.use_precomputed_features=false",
        "distillation.decoder.enabled=true",
        "data.prompts.unlabelled=points",
        "data.prompts.unlabelled_points=3",
    )
    parts, dataset = meta_parts(settings, data)
    dataset.label_free = LabelFree("points", num_points=3)
    batch = collate_training([dataset[0], dataset[1]])
    targets = batch.num_targets()
    batch = batch.to(parts.device)
    groups = prompt_groups(batch, parts.device)
    objects = sum(len(group.objects) for group in groups)
    assert objects == targets + 3
    weights = group_task_weights(groups)
    assert weights is not None and weights.device.type == "meta" and weights.shape == (objects,)
    counts = UnitCounts(2, objects, targets=targets)
    schema = parts.forward.schema
    vector = counts.vector(parts.device)
    units = schema.unit_counts(vector, last_micro_step=True)
    loss, sums = micro_step(parts, batch, groups, units, schema.loss_weights(1.0, vector, 1))
    loss.backward()
    assert loss.device.type == "meta" and sums.device.type == "meta"


def test_label_free_prompts_add_decoder_terms_and_keep_the_task_loss(
    tmp_path: Path, shapes: Path, teacher_checkpoint: Path
) -> None:
    common = [
        *base_assignments(shapes, teacher_checkpoint, tmp_path / "unused"),
        *ONLINE_DECODER,
        "train.steps=1",
    ]
    first_batch = next(setup.step_batches(8, make_settings(*common), 0, 0, Distributed()))
    data = partly_labelled(shapes, tmp_path / "data", [image_ids(shapes)[first_batch[0]]])
    common.append(f"data.train={data}")
    for name, mode in (("none", "none"), ("points", "points")):
        settings = make_settings(*common, f"data.prompts.unlabelled={mode}")
        settings.train.output_dir = tmp_path / name
        run_train(settings)
    (without,) = train_records(tmp_path / "none")
    (with_points,) = train_records(tmp_path / "points")
    for name in ("task/focal", "task/dice", "task/iou_mse"):
        assert with_points[name] == pytest.approx(without[name], rel=1e-6), name
    assert with_points["kd/t/decoder_mse"] != pytest.approx(without["kd/t/decoder_mse"])


def test_label_free_modes_need_the_decoder_terms(tmp_path: Path, shapes: Path) -> None:
    with pytest.raises(SettingsError, match="unlabelled points needs the teachers' decoders"):
        make_settings(f"data.train={shapes}", "data.prompts.unlabelled=points")
    with pytest.raises(SettingsError, match="pseudo_mask_weight 0.5 weighs teacher masks"):
        make_settings("train.pseudo_mask_weight=0.5")


def test_teacher_masks_need_them_in_the_feature_file(
    tmp_path: Path, shapes: Path, teacher_checkpoint: Path, feature_file: Path
) -> None:
    settings = make_settings(
        *base_assignments(shapes, teacher_checkpoint, tmp_path / "run"),
        f"distillation.features={feature_file}",
        "distillation.decoder.enabled=true",
        "data.prompts.unlabelled=teacher_masks",
        "train.steps=1",
    )
    with pytest.raises(UsageError, match="samkd extract --pseudo-masks"):
        run_train(settings)


@pytest.mark.parametrize(
    "extra",
    [
        ["data.prompts.unlabelled=points"],
        [
            "data.prompts.unlabelled=teacher_masks",
            "train.pseudo_mask_weight=0.5",
            "train.prompt_iters=2",
            "data.prompts.mode=mixed",
        ],
    ],
    ids=["points", "teacher masks, weighted, loop"],
)
def test_precomputed_equals_online(
    tmp_path: Path,
    shapes: Path,
    teacher_checkpoint: Path,
    pseudo_mask_file: Path,
    extra: list[str],
) -> None:
    common = [
        *base_assignments(shapes, teacher_checkpoint, tmp_path),
        "distillation.decoder.enabled=true",
        "train.steps=1",
        *KEEP_ALL_MASKS,
        *extra,
    ]
    first_batch = next(setup.step_batches(8, make_settings(*common), 0, 0, Distributed()))
    unlabelled = image_ids(shapes)[first_batch[0]]
    data = partly_labelled(shapes, tmp_path / "data", [unlabelled])
    stored = make_settings(
        *common, f"data.train={data}", f"distillation.features={pseudo_mask_file}"
    )
    stored.train.output_dir = tmp_path / "stored"
    run_train(stored)
    online = make_settings(
        *common, f"data.train={data}", "distillation.use_precomputed_features=false"
    )
    online.train.output_dir = tmp_path / "online"
    run_train(online)
    (from_file,) = train_records(tmp_path / "stored")
    (computed,) = train_records(tmp_path / "online")
    terms = [name for name in computed if name.startswith(("kd/t/", "task/"))]
    assert {"task/focal", "kd/t/decoder_kl", "kd/t/encoder_mse"} <= set(terms)
    for name in terms:
        assert from_file[name] == pytest.approx(computed[name], rel=1e-4, abs=1e-6), name
    if "data.prompts.unlabelled=teacher_masks" in extra:
        cached = json.loads((tmp_path / "online" / PSEUDO_MASK_CACHE).read_text())["masks"]
        store = FeatureStore(pseudo_mask_file)
        assert cached[unlabelled] == store.pseudo_masks(unlabelled) != []
        store.close()
