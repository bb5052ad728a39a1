"""`samkd eval --amg`: the metrics on hand-made masks, and automatic masks end to end on tiny
generated data with a small preset."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from samkd.cli import app
from samkd.data.images import preprocess_image
from samkd.demo.shapes import write_shapes_dataset
from samkd.errors import UsageError
from samkd.evaluate import run_eval
from samkd.evaluate.amg import (
    AmgAgreement,
    AmgTable,
    GeneratedMasks,
    best_ious,
    check_amg_options,
    encode_masks,
    generate_masks,
    match_masks,
    pairwise_iou,
    recall,
)
from samkd.evaluate.predict import encode_images
from samkd.features.pseudo_masks import decode_pseudo_masks
from samkd.models import build_sam, save_state_dict
from samkd.settings import AmgSettings, Settings, load_settings

MODEL = "vit_t_mini"
IMAGE_SIZE = 64
# A 2 x 2 grid, and all 12 masks pass: a random model predicts low IoUs, unstable masks, and
# boxes that nearly all cover the whole image.
AMG_OPTIONS = {
    "points_per_side": 2,
    "pred_iou_thresh": 0.0,
    "stability_score_thresh": 0.0,
    "box_nms_thresh": 1.0,
}
AMG = [f"eval.amg.{key}={value}" for key, value in AMG_OPTIONS.items()]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "student.pt"
    save_state_dict(build_sam(MODEL, image_size=IMAGE_SIZE), path)
    return path


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_shapes_dataset(tmp_path_factory.mktemp("data") / "shapes", 1, (48, 64))


def settings_for(data: Path, checkpoint: Path, *extra: str) -> Settings:
    return load_settings(
        None,
        [
            f"data.val={data}",
            f"data.image_size={IMAGE_SIZE}",
            f"student.model_type={MODEL}",
            f"student.checkpoint={checkpoint}",
            "data.num_workers=0",
            "eval.speed=false",
            "eval.prompts=[box]",
            "eval.multimask=false",
            "eval.amg.enabled=true",
            *AMG,
            *extra,
        ],
        environ={},
    )


def squares(*boxes: tuple[int, int, int, int], size: tuple[int, int] = (4, 4)) -> torch.Tensor:
    """`N x H x W` masks, each True on rows `y0:y1` and columns `x0:x1` of one box."""
    masks = torch.zeros(len(boxes), *size, dtype=torch.bool)
    for mask, (y0, y1, x0, x1) in zip(masks, boxes, strict=True):
        mask[y0:y1, x0:x1] = True
    return masks


# --------------------------------------------------------------------------- metrics


def test_recall_and_best_iou_by_hand() -> None:
    # On a 4 x 4 image: A the top-left 2 x 2, B the right half, C the bottom-left pixel.
    targets = squares((0, 2, 0, 2), (0, 4, 2, 4), (3, 4, 0, 1))
    # One mask is A exactly; the other, B's top half (IoU 4 / 8); nothing covers C.
    generated = GeneratedMasks(encode_masks(squares((0, 2, 0, 2), (0, 2, 2, 4))), seconds=0.5)
    ious = pairwise_iou(generated.rles, encode_masks(targets))
    np.testing.assert_allclose(ious, [[1.0, 0.0, 0.0], [0.0, 0.5, 0.0]])
    best = best_ious(ious)
    np.testing.assert_allclose(best, [1.0, 0.5, 0.0])
    assert recall(best, 0.5) == pytest.approx(2 / 3)
    assert recall(best, 0.75) == pytest.approx(1 / 3)
    assert recall(np.zeros(0), 0.5) is None
    np.testing.assert_allclose(best_ious(np.zeros((0, 3))), [0.0, 0.0, 0.0])

    table = AmgTable()
    table.add_image(encode_masks(targets), targets.flatten(1).sum(dim=1), generated)
    table.add_image([], torch.zeros(0), GeneratedMasks([], seconds=1.5))  # no objects, no masks
    summary = table.summary()
    assert summary["recall_50"] == pytest.approx(2 / 3)
    assert summary["recall_75"] == pytest.approx(1 / 3)
    assert summary["mean_best_iou"] == pytest.approx(0.5)
    assert (summary["objects"], summary["objects_small"], summary["objects_large"]) == (3, 3, 0)
    assert summary["mean_best_iou_small"] == pytest.approx(0.5)
    assert summary["mean_best_iou_large"] is None and summary["recall_50_large"] is None
    assert (summary["images"], summary["masks_per_image"]) == (2, 1.0)
    assert summary["seconds_per_image"] == pytest.approx(1.0)


def test_matching_is_one_to_one_and_greedy() -> None:
    ious = np.array([[0.9, 0.6, 0.0], [0.8, 0.2, 0.0], [0.0, 0.0, 0.4]])
    # (0, 0) goes first; row 1 and column 1 then have no partner of IoU 0.5; 0.4 is too low.
    assert match_masks(ious) == [(0, 0, pytest.approx(0.9))]
    assert match_masks(ious, threshold=0.1) == [
        (0, 0, pytest.approx(0.9)),
        (2, 2, pytest.approx(0.4)),
        (1, 1, pytest.approx(0.2)),
    ]
    assert match_masks(np.zeros((0, 2))) == []


def test_agreement_counts_teacher_masks_matched() -> None:
    masks = squares((0, 2, 0, 2), (0, 4, 2, 4), (3, 4, 0, 1))
    model = GeneratedMasks(encode_masks(masks[:2]), seconds=0.0)
    teacher = GeneratedMasks(encode_masks(masks), seconds=0.0)
    agreement = AmgAgreement()
    agreement.add_image(model, teacher)
    summary = agreement.summary()
    assert (summary["model_masks"], summary["teacher_masks"], summary["matched"]) == (2, 3, 2)
    assert summary["matched_fraction"] == pytest.approx(2 / 3)
    assert summary["model_matched_fraction"] == pytest.approx(1.0)
    assert summary["mean_matched_iou"] == pytest.approx(1.0)


def test_masks_of_different_sizes_are_refused() -> None:
    small, large = (
        encode_masks(squares((0, 1, 0, 1))),
        encode_masks(squares((0, 1, 0, 1), size=(5, 4))),
    )
    with pytest.raises(ValueError, match="masks of different sizes"):
        pairwise_iou(small, large)


# --------------------------------------------------------------------------- end to end


def own_masks_dataset(root: Path, checkpoint: Path, options: AmgSettings) -> int:
    """A one-image dataset whose objects are the model's own automatic masks; returns their
    number."""
    image = np.random.default_rng(0).integers(0, 256, size=(48, 64, 3), dtype=np.uint8)
    (root / "image").mkdir(parents=True)
    Image.fromarray(image).save(root / "image" / "a.png")
    model = build_sam(MODEL, image_size=IMAGE_SIZE, checkpoint=checkpoint).eval()
    generated = generate_masks(model, image, options)
    masks = decode_pseudo_masks(generated.rles, (48, 64))
    (root / "mask" / "a").mkdir(parents=True)
    for number, mask in enumerate(masks):
        Image.fromarray(mask.astype(np.uint8) * 255).save(root / "mask" / "a" / f"{number}.png")
    return len(masks)


def test_model_finds_every_one_of_its_own_masks(tmp_path: Path, checkpoint: Path) -> None:
    objects = own_masks_dataset(tmp_path / "own", checkpoint, AmgSettings(**AMG_OPTIONS))
    settings = settings_for(tmp_path / "own", checkpoint)
    assert objects == 12
    report = run_eval(settings)
    amg = report["amg"]
    assert (amg["images"], amg["objects"], amg["masks_per_image"]) == (1, objects, objects)
    assert amg["recall_50"] == amg["recall_75"] == 1.0
    assert amg["mean_best_iou"] == pytest.approx(1.0)
    assert amg["seconds_per_image"] > 0
    assert "teacher_amg" not in report


def test_agreement_with_itself_is_one(shapes: Path, checkpoint: Path) -> None:
    teacher = f"teachers=[{{name: same, model_type: {MODEL}, checkpoint: {checkpoint}}}]"
    report = run_eval(settings_for(shapes, checkpoint, teacher), teacher="same")
    agreement = report["amg_agreement"]
    assert agreement["teacher_masks"] == agreement["model_masks"] == agreement["matched"] > 0
    assert agreement["matched_fraction"] == 1.0
    assert agreement["mean_matched_iou"] == pytest.approx(1.0)
    for key in ("recall_50", "recall_75", "mean_best_iou", "objects", "masks_per_image"):
        assert report["teacher_amg"][key] == report["amg"][key]


def test_stored_embedding_gives_the_masks_of_the_image(checkpoint: Path) -> None:
    """A teacher stored in a feature file (`--features`) generates from its stored embedding
    the masks that it generates running its encoder on the image."""
    model = build_sam(MODEL, image_size=IMAGE_SIZE, checkpoint=checkpoint).eval()
    image = np.random.default_rng(1).integers(0, 256, size=(48, 64, 3), dtype=np.uint8)
    options = AmgSettings(**AMG_OPTIONS)
    embedding = encode_images(model, preprocess_image(image, IMAGE_SIZE)[0][None])
    stored = generate_masks(model, image, options, embedding)
    assert stored.rles == generate_masks(model, image, options).rles
    cropped = options.model_copy(update={"crop_n_layers": 1})
    with pytest.raises(UsageError, match="eval.amg.crop_n_layers 1 needs the teacher's image"):
        check_amg_options(cropped, stored_teacher=True)


def test_cli_writes_amg_json_and_overlays(tmp_path: Path, shapes: Path, checkpoint: Path) -> None:
    json_path = tmp_path / "eval.json"
    options = [option for setting in AMG for option in ("--set", setting)]
    result = CliRunner().invoke(
        app,
        [
            "eval", "--amg",
            "--model-type", MODEL,
            "--checkpoint", str(checkpoint),
            "--data", str(shapes),
            "--json", str(json_path),
            "--overlays", str(tmp_path / "overlays"),
            "--set", f"data.image_size={IMAGE_SIZE}",
            "--set", "eval.speed=false",
            "--set", "eval.prompts=[box]",
            "--set", "data.num_workers=0",
            *options,
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "automatic masks vs ground truth" in result.stdout
    amg = json.loads(json_path.read_text())["amg"]
    assert amg["images"] == 1
    assert amg["objects"] == sum(amg[f"objects_{size}"] for size in ("small", "medium", "large"))
    for key in ("recall_50", "recall_75", "mean_best_iou"):
        assert 0.0 <= amg[key] <= 1.0
    assert amg["masks_per_image"] > 0 and amg["seconds_per_image"] > 0
    assert len(list((tmp_path / "overlays").glob("*_amg.png"))) == 1


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        (["eval.amg.points_per_side=0"], "eval.amg.points_per_side: Input should be greater than"),
        (
            [
                "eval.amg.points_per_side=3",
                "eval.amg.crop_n_layers=1",
                "eval.amg.crop_n_points_downscale_factor=4",
            ],
            "points_per_side 3 leaves no points in crop layer 1",
        ),
    ],
)
def test_bad_amg_setting_is_one_line(setting: list[str], expected: str) -> None:
    options = [option for value in setting for option in ("--set", value)]
    result = CliRunner().invoke(app, ["eval", "--amg", *options])
    assert result.exit_code == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and expected in lines[0], result.stderr


@pytest.mark.skipif(importlib.util.find_spec("cv2") is not None, reason="OpenCV is installed")
def test_small_region_removal_without_opencv_is_refused() -> None:
    with pytest.raises(UsageError, match="eval.amg.min_mask_region_area 100 needs OpenCV"):
        check_amg_options(AmgSettings(min_mask_region_area=100), stored_teacher=False)
