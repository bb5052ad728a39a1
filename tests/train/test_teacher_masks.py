"""The online teacher's automatic masks (`data.prompts.unlabelled: teacher_masks`): every image
that can train label-free gets them, as from a feature file; the cache in the run folder is
keyed on what decides them; a resumed run reads it back; 2 ranks share the work."""

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from loguru import logger
from PIL import Image
from rich.console import Console

from samkd.features import FeatureStore
from samkd.features.pseudo_masks import decode_pseudo_masks
from samkd.runtime import input_image_size, resolve_precision
from samkd.settings import Settings
from samkd.train import setup
from samkd.train.batches import Augmentation, DistillationDataset
from samkd.train.label_free import LabelFree
from samkd.train.teacher_masks import PSEUDO_MASK_CACHE, label_free_of
from samkd.train.teachers import load_online_teacher

from .conftest import KEEP_ALL_MASKS, base_assignments, extract_float32, make_settings
from .conftest import write_teacher_weights as write_weights
from .test_conditions import image_ids, run_two_ranks_rank_one_unlabelled, train_records

QUIET = Console(quiet=True)
CPU = torch.device("cpu")
TEACHER_MASKS = [
    "distillation.use_precomputed_features=false",
    "distillation.decoder.enabled=true",
    "data.prompts.unlabelled=teacher_masks",
    "train.pseudo_mask_weight=0.5",
    "data.image_size=128",
    *KEEP_ALL_MASKS,
]


def labels_dataset(shapes: Path, root: Path, count: int, background: str | None) -> Path:
    """The first `count` images of `shapes` in the `labels` layout (one label image per
    image); the label image of `background` holds no object."""
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for image_id in image_ids(shapes)[:count]:
        shutil.copy(shapes / "image" / f"{image_id}.png", root / "images" / f"{image_id}.png")
        masks = [
            np.asarray(Image.open(p)) > 0 for p in sorted((shapes / "mask" / image_id).iterdir())
        ]
        labels = np.zeros(masks[0].shape, dtype=np.uint8)
        if image_id != background:
            for number, mask in enumerate(masks, start=1):
                labels[mask] = number
        Image.fromarray(labels).save(root / "labels" / f"{image_id}.png")
    return root


def online(settings: Settings, dataset=None) -> LabelFree:
    """The run's `LabelFree` with the online teacher of `settings`."""
    dataset = dataset or setup.build_train_dataset(settings)
    entry = settings.teachers[0]
    size = input_image_size(settings)
    teacher = load_online_teacher(entry, size, ["encoder.embed"], CPU, fast="off")
    precision = resolve_precision("fp32", CPU)
    return label_free_of(settings, dataset, None, [teacher], precision, QUIET)


@pytest.fixture
def warnings() -> Iterator[list[str]]:
    """The lines logged at WARNING or above while the test runs."""
    lines: list[str] = []
    handler = logger.add(lambda message: lines.append(message.record["message"]), level="WARNING")
    yield lines
    logger.remove(handler)


def assert_same_masks(computed: list[dict], stored: list[dict]) -> None:
    """The same masks, pixel for pixel, with the same scores up to float rounding (the
    feature file's embeddings come from a batch of images, these from one image)."""
    assert len(computed) == len(stored) > 0
    assert decode_pseudo_masks(computed).tolist() == decode_pseudo_masks(stored).tolist()
    for mine, theirs in zip(computed, stored, strict=True):
        assert mine["predicted_iou"] == pytest.approx(theirs["predicted_iou"], rel=1e-4)


def test_every_image_gets_the_teacher_masks_a_feature_file_gives(
    tmp_path: Path, shapes: Path, teacher_checkpoint: Path
) -> None:
    """An all-background label image trains label-free: online as from a feature file."""
    background = image_ids(shapes)[1]
    data = labels_dataset(shapes, tmp_path / "data", 3, background)
    assignments = [*base_assignments(data, teacher_checkpoint, tmp_path / "run"), *TEACHER_MASKS]
    settings = make_settings(*assignments)
    lookup = online(settings).pseudo_masks
    features = extract_float32(
        data, teacher_checkpoint, tmp_path / "features.h5", "[encoder.embed]",
        "data.image_size=128", "extract.pseudo_masks.enabled=true", *KEEP_ALL_MASKS,
    )  # fmt: skip
    store = FeatureStore(features)
    assert lookup is not None
    for image_id in image_ids(shapes)[:3]:
        assert_same_masks(lookup(image_id), store.pseudo_masks(image_id))
    for label_free in (online(settings), LabelFree("teacher_masks", 8, 0.5, store.pseudo_masks)):
        images = setup.build_train_dataset(settings)
        dataset = DistillationDataset(images, None, Augmentation(), 0, label_free)
        index = [record.image_id for record in images.records].index(background)
        item = dataset[index]
        assert item.sample.prompt_kinds and item.task_weights is not None
        assert item.task_weights.tolist() == [0.5] * len(item.sample.prompt_kinds)
    store.close()


def test_labelled_images_whose_objects_a_crop_left_out_train_label_free(
    tmp_path: Path, shapes: Path, teacher_checkpoint: Path
) -> None:
    settings = make_settings(
        *base_assignments(shapes, teacher_checkpoint, tmp_path / "run"), *TEACHER_MASKS
    )
    images = setup.build_train_dataset(settings)
    crop = Augmentation(crop_scale=(0.02, 0.02))
    dataset = DistillationDataset(images, None, crop, 0, online(settings, images))
    cropped_out = []
    for epoch in range(3):
        dataset.set_epoch(epoch)
        for index in range(len(dataset)):
            item = dataset[index]
            assert images.records[index].mask_sources  # every image is labelled
            if item.task_weights is not None and len(item.task_weights):
                assert item.task_weights.tolist() == [0.5] * len(item.task_weights)
                cropped_out.append(item.sample.image_id)
    assert cropped_out, "no crop left out every object"


def test_the_cache_holds_what_decides_the_masks(
    tmp_path: Path, unlabelled: Path, teacher_checkpoint: Path, generated_teacher_masks: list[str],
    warnings: list[str],
) -> None:  # fmt: skip
    generated = generated_teacher_masks
    data = tmp_path / "data"
    (data / "image").mkdir(parents=True)
    for image in sorted((unlabelled / "image").iterdir())[:4]:
        shutil.copy(image, data / "image")
    ids = image_ids(data)
    common = [*base_assignments(data, teacher_checkpoint, tmp_path / "run"), *TEACHER_MASKS]
    cache = tmp_path / "run" / PSEUDO_MASK_CACHE

    def run(*extra: str) -> dict[str, list]:
        label_free = online(make_settings(*common, *extra))
        assert label_free.pseudo_masks is not None
        return {image_id: label_free.pseudo_masks(image_id) for image_id in image_ids(data)}

    first = run()
    assert sorted(generated) == ids and warnings == []
    generated.clear()
    assert run() == first and generated == []  # read back

    other = write_weights(tmp_path / "other.pt", seed=2)
    teacher = f"teachers=[{{name: t, model_type: vit_mini, checkpoint: {other}}}]"
    assert run(teacher) != first and sorted(generated) == ids
    (line,) = warnings
    new_sha = json.loads(cache.read_text())["key"]["weights_sha256"]
    assert line.startswith(f"{cache}: made with other teacher weights (sha256 ")
    assert line.endswith(f", now {new_sha[:12]}...); generating the teacher masks of all 4 images")
    generated.clear()

    run(teacher, "data.image_size=64")
    assert sorted(generated) == ids and "made with data.image_size 128, now 64" in warnings[-1]
    generated.clear()
    run(teacher, "data.image_size=64", "extract.pseudo_masks.points_per_side=2")
    assert sorted(generated) == ids
    assert "extract.pseudo_masks.points_per_side 4, now 2" in warnings[-1]
    generated.clear()

    # A new image, and an image whose file now holds another picture: only they are made.
    shutil.copy(data / "image" / f"{ids[0]}.png", data / "image" / "new.png")
    shutil.copy(data / "image" / f"{ids[2]}.png", data / "image" / f"{ids[1]}.png")
    masks = run(teacher, "data.image_size=64", "extract.pseudo_masks.points_per_side=2")
    assert sorted(generated) == sorted([ids[1], "new"])
    assert "2 of 5 images are new or changed (e.g. 'new')" in warnings[-1]
    assert masks["new"] == masks[ids[0]] and masks[ids[1]] == masks[ids[2]]
    assert len(warnings) == 4


def test_two_ranks_each_generate_their_share_and_train_on_one_cache(
    tmp_path: Path, shapes: Path, teacher_checkpoint: Path
) -> None:
    """2 gloo ranks, rank 1's first step unlabelled: every image's masks are made once, by
    one rank or the other, and both ranks look up the same masks, those of the cache."""
    records = tmp_path / "records"
    records.mkdir()
    assignments = [
        *base_assignments(shapes, teacher_checkpoint, tmp_path / "ddp"),
        *TEACHER_MASKS,
        "train.batch_size=4",
        "train.steps=1",
    ]
    program = [str(Path(__file__).with_name("torchrun_train.py")), str(records)]
    run_two_ranks_rank_one_unlabelled(assignments, shapes, tmp_path, 29547, program)
    shares = [(records / f"generated-{rank}.txt").read_text().split() for rank in (0, 1)]
    assert sorted(shares[0] + shares[1]) == image_ids(shapes)  # each image once
    assert len(shares[0]) == len(shares[1]) == 4
    cached = json.loads((tmp_path / "ddp" / PSEUDO_MASK_CACHE).read_text())["masks"]
    for rank in (0, 1):
        assert json.loads((records / f"masks-{rank}.json").read_text()) == cached
    assert all(cached[image_id] for image_id in image_ids(shapes))
    (record,) = train_records(tmp_path / "ddp")
    assert record["kd/t/decoder_kl"] > 0 and record["task/focal"] > 0
