"""`run_eval` end to end on small generated data with a small preset."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from samkd.cli import app
from samkd.data import build_dataset
from samkd.demo.shapes import write_shapes_dataset
from samkd.evaluate import run_eval
from samkd.evaluate.overlays import object_colour
from samkd.evaluate.predict import ObjectPrompts, encode_images, predict_masks
from samkd.evaluate.prompts import box_prompts
from samkd.extract import run_extract
from samkd.models import build_sam, save_state_dict
from samkd.settings import load_settings

from ..conftest import EmptyMaskRun
from ..data.conftest import make_coco_dataset, make_folder_dataset, make_sa1b_dataset
from .dense import write_dense_dataset

MODEL = "vit_t_mini"


def self_predicted_dataset(root: Path, checkpoint: Path) -> None:
    """A one-image dataset whose masks are the model's own box-prompted predictions, found
    by iterating box -> mask -> box until the box no longer changes."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, size=(200, 256, 3), dtype=np.uint8)
    (root / "image").mkdir(parents=True)
    Image.fromarray(image).save(root / "image" / "a.png")
    mask_dir = root / "mask" / "a"
    mask_dir.mkdir(parents=True)
    Image.fromarray(np.full((200, 256), 255, np.uint8)).save(mask_dir / "obj_0.png")
    sample = build_dataset(root, image_size=256)[0]
    model = build_sam(MODEL, checkpoint=checkpoint)
    embedding = encode_images(model, sample.image[None])
    boxes = torch.tensor([[30.0, 20.0, 120.0, 150.0]])
    for _ in range(10):
        masks = predict_masks(model, embedding, ObjectPrompts(boxes=boxes), (200, 256), False)
        predicted = masks.masks[:, 0]
        assert predicted.any(), "the model predicted an empty mask"
        next_boxes = box_prompts(predicted).boxes
        if torch.equal(next_boxes, boxes):
            break
        boxes = next_boxes
    else:
        pytest.fail("box prompts did not reach a fixed point")
    Image.fromarray(predicted[0].numpy().astype(np.uint8) * 255).save(mask_dir / "obj_0.png")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "student.pt"
    save_state_dict(build_sam(MODEL), path)
    return path


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_shapes_dataset(tmp_path_factory.mktemp("data") / "shapes", 3, (96, 128))


def settings_for(data: Path, checkpoint: Path, *extra: str):
    return load_settings(
        None,
        [
            f"data.val={data}",
            f"student.model_type={MODEL}",
            f"student.checkpoint={checkpoint}",
            "data.num_workers=0",
            "eval.speed=false",
            *extra,
        ],
        environ={},
    )


def test_model_scores_one_on_its_own_masks(tmp_path: Path, checkpoint: Path) -> None:
    self_predicted_dataset(tmp_path / "own", checkpoint)
    settings = settings_for(
        tmp_path / "own", checkpoint, "eval.prompts=[box]", "eval.multimask=false"
    )
    report = run_eval(settings)
    for metric in ("miou", "image_miou", "dice", "boundary_iou"):
        assert report["quality"]["box"]["single"][metric] == pytest.approx(1.0)


def test_agreement_with_itself_is_one(shapes: Path, checkpoint: Path) -> None:
    settings = settings_for(
        shapes,
        checkpoint,
        f"teachers=[{{name: same, model_type: {MODEL}, checkpoint: {checkpoint}}}]",
        "eval.prompts=[box, point, points]",
        "eval.num_points=2",
    )
    report = run_eval(settings, teacher="same")
    for prompt in ("box", "point", "points-2"):
        for output in ("single", "best"):
            assert report["agreement"][prompt][output]["miou"] == pytest.approx(1.0)
            assert (
                report["teacher_quality"][prompt][output]["miou"]
                == report["quality"][prompt][output]["miou"]
            )


def test_cli_writes_json_and_overlays(tmp_path: Path, shapes: Path, checkpoint: Path) -> None:
    json_path = tmp_path / "out" / "eval.json"
    result = CliRunner().invoke(
        app,
        [
            "eval",
            "--model-type", MODEL,
            "--checkpoint", str(checkpoint),
            "--data", str(shapes),
            "--json", str(json_path),
            "--overlays", str(tmp_path / "overlays"),
            "--set", "eval.repeats=2",
            "--set", "eval.warmup=0",
            "--set", "data.num_workers=0",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(json_path.read_text())
    assert set(report) >= {"samkd_version", "dataset", "model", "quality", "speed", "settings"}
    assert report["dataset"]["images"] == 3
    entry = report["quality"]["box"]["best"]
    for metric in ("miou", "image_miou", "dice", "boundary_iou"):
        assert 0.0 <= entry[metric] <= 1.0
    assert entry["dice"] >= entry["miou"]  # Dice = 2 IoU / (1 + IoU) per object
    assert entry["count"] == report["dataset"]["objects"]
    assert entry["count"] == sum(entry[f"count_{size}"] for size in ("small", "medium", "large"))
    assert report["speed"]["model"]["encoder_latency"]["repeats"] == 2
    assert report["model"]["model_type"] == MODEL
    drawn = sorted(path.name for path in (tmp_path / "overlays").iterdir())
    assert drawn == [f"shape_{number:05d}.png" for number in range(3)]  # one per image
    assert entry["empty_fraction"] == 0.0


def test_stored_teacher_matches_the_built_teacher(
    tmp_path: Path, shapes: Path, checkpoint: Path
) -> None:
    teacher = f"teachers=[{{name: t, model_type: {MODEL}, checkpoint: {checkpoint}}}]"
    features = tmp_path / "features.h5"
    run_extract(
        load_settings(
            None,
            [teacher, f"data.train={shapes}", f"extract.output={features}",
             "extract.dtype=float32", f"student.model_type={MODEL}", "data.num_workers=0"],
            environ={},
        )
    )  # fmt: skip
    settings = settings_for(shapes, checkpoint, teacher)
    built = run_eval(settings, teacher="t")
    stored = run_eval(settings, features=features)
    assert stored["teacher"]["model_type"] == MODEL
    for prompt in ("box", "point"):
        for output in ("single", "best"):
            left = stored["teacher_quality"][prompt][output]["miou"]
            assert left == pytest.approx(built["teacher_quality"][prompt][output]["miou"], abs=1e-3)
            assert stored["agreement"][prompt][output]["miou"] == pytest.approx(1.0, abs=1e-3)


def test_deterministic(shapes: Path, checkpoint: Path) -> None:
    settings = settings_for(shapes, checkpoint, "eval.prompts=[points]")
    assert run_eval(settings)["quality"] == run_eval(settings)["quality"]


def test_missing_dataset_is_one_line_error(checkpoint: Path) -> None:
    result = CliRunner().invoke(app, ["eval", "--model-type", MODEL])
    assert result.exit_code == 1
    assert (
        result.stderr.strip() == "error: no dataset to evaluate: pass --data FOLDER or set data.val"
    )


@pytest.mark.parametrize(
    ("layout", "make"),
    [("folder", make_folder_dataset), ("coco", make_coco_dataset), ("sa1b", make_sa1b_dataset)],
)
def test_every_dataset_layout(layout: str, make, tmp_path: Path, checkpoint: Path) -> None:
    masks = make(tmp_path / layout)
    settings = settings_for(tmp_path / layout, checkpoint, f"data.layout={layout}")
    report = run_eval(settings)
    expected = sum(len(object_masks) for object_masks in masks.values())
    assert report["dataset"]["objects"] == expected
    assert report["quality"]["box"]["single"]["count"] == expected


def test_dense_images_give_a_few_readable_overlays_and_empty_masks_a_warning(
    tmp_path: Path, empty_mask_run: EmptyMaskRun
) -> None:
    """150 small objects per image, a model whose masks are all empty (trained at 128 px,
    taken from its run folder): at most eval.overlay_images pictures, the objects outlined
    in them, and one warning line."""
    data = write_dense_dataset(tmp_path / "cells", images=2, objects=150)
    json_path = tmp_path / "eval.json"
    result = CliRunner().invoke(
        app,
        ["eval", "--checkpoint", str(empty_mask_run.folder / "student.pt"), "--data", str(data),
         "--overlays", str(tmp_path / "overlays"), "--json", str(json_path),
         "--set", "eval.overlay_images=1", "--set", "eval.prompts=[box]",
         "--set", "eval.multimask=false", "--set", "eval.speed=false",
         "--set", "data.num_workers=0"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if "empty masks" in line]
    assert len(warnings) == 1 and warnings[0].endswith(
        "the model predicts empty masks for 100% of objects (box prompts, single output): "
        "undertrained or wrong input scale?"
    )
    report = json.loads(json_path.read_text())
    assert report["model"]["image_size"] == 128
    assert report["quality"]["box"]["single"]["empty_fraction"] == 1.0
    assert report["quality"]["box"]["single"]["count"] == 300
    drawn = sorted((tmp_path / "overlays").iterdir())
    assert [path.name for path in drawn] == ["cells_0.png"]
    for path in drawn:
        with Image.open(path) as picture:
            pixels = np.asarray(picture.convert("RGB"))
        assert max(pixels.shape[:2]) >= 768  # 288 x 384 images, drawn at twice their size
        # Every object outlined in white and its box drawn in a colour of its own.
        white = (pixels == 255).all(axis=2)
        assert white.sum() > 150 * 20
        colours = {tuple(colour) for colour in pixels.reshape(-1, 3)[::7]}
        assert len(colours & {object_colour(index) for index in range(150)}) > 100
