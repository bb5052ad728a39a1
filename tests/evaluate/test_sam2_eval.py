"""`samkd eval` of SAM 2 models: as the model evaluated (`--model-type`), as a teacher built
(`--teacher`) or stored in a feature file (`--features`), with automatic masks."""

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

pytest.importorskip("sam2")

from sam2.sam2_image_predictor import SAM2ImagePredictor  # noqa: E402

from samkd.cli import app  # noqa: E402
from samkd.data import build_dataset, load_rgb_image, preprocess_square  # noqa: E402
from samkd.demo.shapes import write_shapes_dataset  # noqa: E402
from samkd.evaluate import run_eval  # noqa: E402
from samkd.evaluate.metrics import mask_iou  # noqa: E402
from samkd.evaluate.prompts import box_prompts  # noqa: E402
from samkd.extract import run_extract  # noqa: E402
from samkd.models import build_sam  # noqa: E402
from samkd.settings import load_settings  # noqa: E402

SIZE = 64
COMMON = [f"data.image_size={SIZE}", "data.num_workers=0", "eval.speed=false"]
AMG = [
    "eval.amg.enabled=true",
    "eval.amg.points_per_side=2",
    "eval.amg.pred_iou_thresh=0",
    "eval.amg.stability_score_thresh=0",
]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_shapes_dataset(tmp_path_factory.mktemp("data") / "shapes", 2, (96, 128))


def test_sam2_model_scores_what_sam2_image_predictor_predicts(shapes: Path) -> None:
    """The box mIoU of `--model-type hiera_mini` is that of sam2's own predictor's masks."""
    settings = load_settings(
        None, [f"data.val={shapes}", "student.model_type=hiera_mini", *COMMON], environ={}
    )
    report = run_eval(settings, teacher="vit_mini")
    assert report["model"]["frame"] == "square" and "frame" not in report["teacher"]
    torch.manual_seed(settings.eval.seed)  # as run_eval builds the student: seeded random
    model = build_sam("hiera_mini", image_size=SIZE).eval()
    predictor = SAM2ImagePredictor(model)
    ious = []
    for sample in build_dataset(shapes, image_size=SIZE):
        image = load_rgb_image(Path(shapes) / "image" / f"{sample.image_id}.png")
        with torch.no_grad():
            embedding, high_res = model.image_encoder.encode(preprocess_square(image, SIZE)[None])
        predictor._features = {"image_embed": embedding, "high_res_feats": list(high_res)}
        predictor._orig_hw, predictor._is_image_set = [image.shape[:2]], True
        boxes = box_prompts(sample.masks).boxes
        assert boxes is not None
        masks, _, _ = predictor._predict(
            None,
            None,
            predictor._transforms.transform_boxes(boxes, normalize=True, orig_hw=image.shape[:2]),
            multimask_output=False,
        )
        ious.append(mask_iou(masks[:, 0], sample.masks))
    expected = torch.cat(ious).mean().item()
    assert report["quality"]["box"]["single"]["miou"] == pytest.approx(expected, abs=1e-6)
    assert report["agreement"]["box"]["single"]["count"] == len(torch.cat(ious))


def test_stored_sam2_teacher_equals_the_built_one(tmp_path: Path, shapes: Path) -> None:
    """A SAM 2 teacher's stored features and decoder (float32) score as the teacher does,
    automatic masks included; without its high-resolution maps, one line says how to store
    them."""
    features = tmp_path / "features.h5"
    extract = load_settings(
        None,
        [
            f"data.train={shapes}",
            *COMMON,
            "student.model_type=vit_t_mini",
            "teachers=[{name: hiera_mini, model_type: hiera_mini}]",
            f"extract.output={features}",
            "extract.dtype=float32",
            "extract.high_res=true",
        ],
        environ={},
    )
    run_extract(extract)
    arguments = ["eval", "--data", str(shapes), "--json", str(tmp_path / "r.json")]
    options = [f"--set={value}" for value in [*COMMON, *AMG, "student.model_type=vit_t_mini"]]
    stored = CliRunner().invoke(app, [*arguments, *options, "--features", str(features)])
    assert stored.exit_code == 0, stored.output
    from_file = (tmp_path / "r.json").read_text()
    built = CliRunner().invoke(app, [*arguments, *options, "--teacher", "hiera_mini"])
    assert built.exit_code == 0, built.output
    stored_report = json.loads(from_file)
    built_report = json.loads((tmp_path / "r.json").read_text())
    assert stored_report["teacher"]["frame"] == "square"
    assert stored_report["teacher_quality"] == built_report["teacher_quality"]
    assert (
        stored_report["teacher_amg"]["masks_per_image"]
        == built_report["teacher_amg"]["masks_per_image"]
    )

    without = tmp_path / "no_maps.h5"
    extract.extract.output, extract.extract.high_res = without, False
    run_extract(extract)
    result = CliRunner().invoke(app, [*arguments, *options, "--features", str(without)])
    assert result.exit_code != 0
    assert "has no encoder.high_res.0" in result.output
    assert "extract.high_res=true" in result.output
