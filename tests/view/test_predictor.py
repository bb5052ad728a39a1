"""Answering clicks: the embedding cache, `samkd eval`'s IoU for the same click, the object a
prompt points at, and ONNX against PyTorch."""

from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console

from samkd.data import build_dataset
from samkd.evaluate.prompts import center_point_prompts
from samkd.evaluate.quality import QualityOptions, QualityTables, evaluate_image
from samkd.settings import DataSettings, load_settings
from samkd.view.images import DatasetImages, uploaded_image
from samkd.view.predictor import (
    BEST_SCORE,
    SINGLE,
    Click,
    Embedding,
    EmbeddingCache,
    Predictor,
    Prompts,
    ViewImage,
    nearest_object,
)
from samkd.view.sources import LoadedModel, SourceSpec, load_model

from .conftest import IMAGE_SIZE


@pytest.fixture(scope="module")
def images(shapes: Path) -> DatasetImages:
    return DatasetImages(shapes, DataSettings())


def centre_click(image: ViewImage, index: int) -> Click:
    """The point `samkd eval`'s `point` prompt puts on object `index`."""
    assert image.objects is not None
    coords = center_point_prompts(torch.from_numpy(image.objects[index : index + 1])).point_coords
    assert coords is not None
    x, y = (int(value) for value in coords[0, 0])
    return Click(x, y, 1)


def test_the_encoder_runs_once_per_image_and_model(
    models: list[LoadedModel], images: DatasetImages
) -> None:
    predictor = Predictor(models)
    image = images.load(0)
    first = predictor.answer(image, Prompts((centre_click(image, 0),)))
    assert predictor.cache.computed == 2
    assert [answer.encoder_cached for answer in first] == [False, False]
    second = predictor.answer(image, Prompts((centre_click(image, 0), Click(3, 3, 0))))
    assert predictor.cache.computed == 2
    assert [answer.encoder_cached for answer in second] == [True, True]
    assert [a.encoder_seconds for a in second] == [a.encoder_seconds for a in first]
    predictor.answer(images.load(1), Prompts((Click(5, 5, 1),)))
    assert predictor.cache.computed == 4


def test_the_cache_computes_a_key_once_and_drops_the_least_recently_used() -> None:
    cache = EmbeddingCache(capacity=2)
    made: list[str] = []

    def compute(name: str) -> Embedding:
        made.append(name)
        return Embedding(torch.zeros(1), 0.0)

    for name in ("a", "b", "a", "c", "a", "b"):
        cache.get_or_compute(("m", name), lambda name=name: compute(name))
    # "b" was the least recently used when "c" came, so it is computed again at the end.
    assert made == ["a", "b", "c", "b"]
    assert cache.computed == 4


def test_iou_equals_what_samkd_eval_computes_for_the_click(
    models: list[LoadedModel], shapes: Path, images: DatasetImages
) -> None:
    """The view's IoU for a click on each object's centre point is `samkd eval`'s point-prompt
    IoU of that object: the single output, and the best of the three choices."""
    student, teacher = (model.model for model in models)
    sample = build_dataset(shapes, image_size=IMAGE_SIZE)[0]
    tables = QualityTables()
    options = QualityOptions(("point",), multimask=True)
    evaluate_image(
        tables, options, sample.image, sample.masks, sample.original_size, student, teacher
    )
    image = images.load(0)
    predictor = Predictor(models)
    assert image.objects is not None and len(image.objects) == len(sample.masks) > 1
    for index in range(len(image.objects)):
        click = centre_click(image, index)
        assert nearest_object(image, Prompts((click,))) == index
        answers = predictor.answer(image, Prompts((click,)))
        for answer, table in zip(answers, (tables.model, tables.teacher), strict=True):
            assert answer.single_iou == table.values[("point", "single", "all")][index]
            assert answer.choice_ious is not None
            assert max(answer.choice_ious) == table.values[("point", "best", "all")][index]


def test_shown_mask_picks_an_output(models: list[LoadedModel], images: DatasetImages) -> None:
    image = images.load(0)
    (answer, _) = Predictor(models).answer(image, Prompts((centre_click(image, 0),)))
    assert answer.mask(SINGLE)[0] is answer.single
    best = int(np.argmax(answer.choice_scores))
    mask, score, iou = answer.mask(BEST_SCORE)
    assert (mask == answer.choices[best]).all() and score == answer.choice_scores[best]
    assert answer.choice_ious is not None and iou == answer.choice_ious[best]
    assert (answer.mask("choice 3")[0] == answer.choices[2]).all()


def test_an_upload_has_no_ground_truth(models: list[LoadedModel], images: DatasetImages) -> None:
    pixels = images.load(1).pixels
    image = uploaded_image(pixels)
    assert image.key == uploaded_image(pixels.copy()).key != uploaded_image(pixels[::-1]).key
    (answer, _) = Predictor(models).answer(image, Prompts((Click(10, 10, 1),)))
    assert answer.single_iou is None and answer.choice_ious is None
    assert answer.single.shape == pixels.shape[:2]


def test_nearest_object() -> None:
    objects = np.zeros((3, 20, 30), dtype=bool)
    objects[0, 2:18, 2:28] = True  # large, under the small one
    objects[1, 5:9, 5:9] = True
    objects[2, 15:18, 25:28] = True
    image = ViewImage("k", "n", np.zeros((20, 30, 3), np.uint8), objects)
    small = objects.copy()
    small[0] = False
    apart = ViewImage("k", "n", np.zeros((20, 30, 3), np.uint8), small)
    assert nearest_object(image, Prompts((Click(6, 6, 1),))) == 1  # the smallest under it
    assert nearest_object(image, Prompts((Click(6, 6, 0), Click(20, 10, 1)))) == 0
    assert nearest_object(apart, Prompts((Click(23, 16, 1),))) == 2  # the nearest
    assert nearest_object(image, Prompts(box=(24, 14, 28, 18))) == 2  # the best box
    assert nearest_object(image, Prompts((Click(6, 6, 0),))) is None
    assert nearest_object(ViewImage("k", "n", image.pixels), Prompts((Click(6, 6, 1),))) is None


def test_prompts_as_eval_prompts() -> None:
    prompts = Prompts((Click(3, 4, 1), Click(5, 6, 0))).with_box((9, 2), (1, 8))
    given = prompts.object_prompts()
    assert given.point_coords is not None and given.point_labels is not None
    assert given.point_coords.tolist() == [[[3.0, 4.0], [5.0, 6.0]]]
    assert given.point_labels.tolist() == [[1.0, 0.0]]
    assert given.boxes is not None and given.boxes.tolist() == [[1.0, 2.0, 9.0, 8.0]]
    assert prompts.without_last().clicks == (Click(3, 4, 1),)
    assert not Prompts(box=(1, 1, 2, 2)).without_last()


def test_onnx_and_checkpoint_give_the_same_mask(
    tmp_path: Path, student_run: Path, images: DatasetImages
) -> None:
    pytest.importorskip("onnxruntime")
    from samkd.evaluate.spec import ModelSpec
    from samkd.export.run import write_pair

    spec = ModelSpec("pt", "vit_t_mini", student_run / "student.pt", IMAGE_SIZE)
    settings = load_settings(None, [f"export.output={tmp_path}"], environ={})
    write_pair(spec.build(torch.device("cpu")), spec, settings, Console(quiet=True))
    checkpoint = load_model(SourceSpec("pt", spec=spec), torch.device("cpu"))
    onnx = load_model(SourceSpec("onnx", onnx=tmp_path), torch.device("cpu"))
    assert (onnx.model_type, onnx.image_size) == ("vit_t_mini", IMAGE_SIZE)
    predictor = Predictor([checkpoint, onnx])
    image = images.load(0)
    for prompts in (
        Prompts((centre_click(image, 0),)),
        Prompts((centre_click(image, 1), Click(2, 2, 0))),
        Prompts(box=(10, 10, 80, 60)),
    ):
        from_checkpoint, from_onnx = predictor.answer(image, prompts)
        assert from_checkpoint.single.any()
        assert (from_checkpoint.single == from_onnx.single).all()
        assert (from_checkpoint.choices == from_onnx.choices).all()
        assert from_checkpoint.single_iou == from_onnx.single_iou
        assert from_onnx.single_score == pytest.approx(from_checkpoint.single_score, abs=1e-5)
