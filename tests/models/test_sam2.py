"""SAM 2 models built from the sam2 package's configs: layout, weights, taps, decoding parity."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("sam2")

from sam2.sam2_image_predictor import SAM2ImagePredictor  # noqa: E402

from samkd.data import preprocess_square, resize_boxes  # noqa: E402
from samkd.errors import UsageError  # noqa: E402
from samkd.evaluate.predict import ObjectPrompts, encode_images, predict_masks  # noqa: E402
from samkd.models import (  # noqa: E402
    MODEL_TYPES,
    CheckpointError,
    available_taps,
    build_sam,
    capture_taps,
    check_weights_file,
    save_state_dict,
)
from samkd.models.frames import FrameMap  # noqa: E402
from samkd.models.registry import is_sam2_type, model_type_info  # noqa: E402
from samkd.settings import SAM2_MODEL_TYPES, model_frame  # noqa: E402
from samkd.train.forward import PromptGroup, encoder_forward, high_res_of  # noqa: E402
from samkd.train.frames import decode_in_frame  # noqa: E402

from .sam2_helpers import non_square_image, package_model, perturbed  # noqa: E402

BOX = np.array([30.0, 20.0, 100.0, 70.0])
POINTS = np.array([[50.0, 40.0], [110.0, 60.0]])
LABELS = np.array([1, 0])


def test_sam2_types_are_registered_with_their_frame() -> None:
    sam2_types = [name for name in MODEL_TYPES if is_sam2_type(name)]
    assert sam2_types == list(SAM2_MODEL_TYPES)
    assert model_type_info("sam2.1_hiera_l").default_image_size == 1024
    assert model_type_info("hiera_mini").default_image_size == 256
    assert model_frame("sam2.1_hiera_b+") == "square"
    assert model_frame("hiera_mini", "longest_side") == "longest_side"
    assert model_frame("vit_h") == "longest_side"


def test_hiera_mini_params_and_official_layout_both_ways(tmp_path: Path) -> None:
    package = perturbed(package_model("hiera_mini", 128))
    ours = build_sam("hiera_mini", image_size=128)
    assert sum(p.numel() for p in ours.parameters()) / 1e6 == pytest.approx(7.7, abs=0.05)
    assert ours.state_dict().keys() == package.state_dict().keys()
    path = tmp_path / "sam2.1_hiera_mini.pt"
    torch.save({"model": package.state_dict()}, path)  # the official checkpoints' wrapping
    loaded = build_sam("hiera_mini", image_size=128, checkpoint=path)
    for key, value in package.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    package.load_state_dict(loaded.state_dict(), strict=True)

    # The embedding and maps are SAM2ImagePredictor's (`set_image_batch`'s, at 128 px).
    images = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        embedding, high_res = loaded.image_encoder.encode(images)
        output = package.forward_image(images)
        _, levels, _, _ = package._prepare_backbone_features(output)
        expected = (levels[-1] + package.no_mem_embed).permute(1, 2, 0).reshape(2, 256, 8, 8)
    assert torch.equal(embedding, expected)
    assert torch.equal(high_res[0], output["backbone_fpn"][0])
    assert torch.equal(high_res[1], output["backbone_fpn"][1])


def test_wrong_family_checkpoint_is_one_line_naming_both(tmp_path: Path) -> None:
    path = tmp_path / "sam_vit_h_4b8939.pth"
    save_state_dict(build_sam("vit_mini"), path)
    with pytest.raises(CheckpointError) as error:
        check_weights_file(build_sam("sam2.1_hiera_l", device="meta"), path, "sam2.1_hiera_l")
    message = str(error.value)
    assert "\n" not in message
    assert "SAM 1 (ViT) weights" in message and "'sam2.1_hiera_l' is SAM 2.1" in message


def test_missing_sam2_package_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "sam2" else real(name, *a)
    )
    with pytest.raises(UsageError) as error:
        build_sam("sam2.1_hiera_t")
    message = str(error.value)
    assert "\n" not in message
    assert "SAM2_BUILD_CUDA=0 pip install 'samkd[sam2]'" in message


def test_taps_high_res_and_stride16_global_attention() -> None:
    model = build_sam("hiera_mini", image_size=128)
    taps = available_taps(model)
    # Hiera-mini's blocks: stage 1 (0), 2 (1), 3 (2, 3; 3 is global), 4 (4).
    assert [tap for tap in taps if tap.startswith("encoder.qk.")] == ["encoder.qk.3"]
    names = ["encoder.high_res.0", "encoder.high_res.1", "encoder.block.2", "encoder.qk.3"]
    with torch.no_grad(), capture_taps(model, names) as captured:
        embedding = model.image_encoder(torch.randn(1, 3, 128, 128))
        shapes = {name: tuple(captured.tensor(name).shape) for name in names[:3]}
        attention = captured.attention("encoder.qk.3")
    assert embedding.shape == (1, 256, 8, 8)
    assert shapes == {
        "encoder.high_res.0": (1, 32, 32, 32),
        "encoder.high_res.1": (1, 64, 16, 16),
        "encoder.block.2": (1, 128, 8, 8),
    }
    assert attention.grid == (8, 8) and attention.window == 0
    assert attention.query.shape == (1, 4, 64, 32)


def installed_predictor(model: torch.nn.Module, image: torch.Tensor) -> SAM2ImagePredictor:
    """sam2's own predictor on `model`'s features of a preprocessed square image."""
    predictor = SAM2ImagePredictor(model)
    with torch.no_grad():
        embedding, high_res = model.image_encoder.encode(image[None])
    predictor._features = {"image_embed": embedding, "high_res_feats": list(high_res)}
    predictor._orig_hw = [(96, 160)]
    predictor._is_image_set = True
    return predictor


def test_eval_and_training_decoding_equal_sam2_image_predictor() -> None:
    """Box and two points, one mask and three: samkd's eval predictor gives sam2's masks, IoUs
    and low-resolution logits; training's decoder (prompts in the student's frame, mapped)
    gives its logits in the square frame."""
    model = perturbed(build_sam("hiera_mini", image_size=128), seed=3)
    image = non_square_image(96, 160)
    pixels = preprocess_square(image, 128)
    predictor = installed_predictor(model, pixels)
    features = encode_images(model, pixels[None])
    for multimask in (False, True):
        masks, iou, low_res = predictor.predict(box=BOX, multimask_output=multimask)
        prompts = ObjectPrompts(boxes=torch.tensor(BOX[None], dtype=torch.float32))
        ours = predict_masks(model, features, prompts, (96, 160), multimask)
        assert torch.equal(ours.masks[0], torch.from_numpy(masks).bool())
        torch.testing.assert_close(ours.iou_predictions[0], torch.from_numpy(iou))
        torch.testing.assert_close(ours.low_res_logits[0], torch.from_numpy(low_res))
        masks, iou, low_res = predictor.predict(POINTS, LABELS, multimask_output=multimask)
        prompts = ObjectPrompts(
            point_coords=torch.tensor(POINTS[None], dtype=torch.float32),
            point_labels=torch.tensor(LABELS[None]),
        )
        ours = predict_masks(model, features, prompts, (96, 160), multimask)
        assert torch.equal(ours.masks[0], torch.from_numpy(masks).bool())
        torch.testing.assert_close(ours.low_res_logits[0], torch.from_numpy(low_res))

    # Training: the same box in the student's frame, as the dataset makes it (77 x 128).
    box = resize_boxes(BOX[None], (96, 160), 128)
    group = PromptGroup(
        torch.tensor([0]),
        torch.tensor([0]),
        boxes=torch.tensor(box, dtype=torch.float32),
        input_sizes=torch.tensor([[77, 128]]),
    )
    with torch.no_grad():
        embedding, encoded = encoder_forward(model, pixels[None], [])
        native = decode_in_frame(
            model.prompt_encoder,
            model.mask_decoder,
            embedding,
            [group],
            False,
            high_res_of(encoded),
            "square",
        )
    masks, iou, low_res = predictor.predict(box=BOX, multimask_output=False)
    assert native.valid is not None and native.valid.shape == (1, 1, 32, 32)
    torch.testing.assert_close(native.iou[0, :1], torch.from_numpy(iou))
    square, _ = FrameMap((77, 128), 128).to_pipeline(torch.from_numpy(low_res)[None], -32.0)
    torch.testing.assert_close(native.mask_logits[0, :1].clamp(-32, 32), square[0])
    # Mapped into the student's frame: its first 19 rows (77 / 4) are the image's.
    assert native.valid[0, 0, :19].all() and not native.valid[0, 0, 20:].any()


@pytest.mark.slow
def test_hiera_t_at_1024_matches_sam2_image_predictor(tmp_path: Path) -> None:
    """Real size, random weights: samkd's Hiera-T teacher gives SAM2ImagePredictor's
    `image_embed` and high-resolution maps (1e-5) on a non-square image, and its masks, IoUs
    and low-resolution logits for a box and for two points (1e-4); the official key layout
    loads both ways (into sam2's `build_sam2` from samkd's weights)."""
    from sam2.build_sam import build_sam2

    from samkd.models import build_teacher

    teacher = build_teacher("sam2.1_hiera_t", 1024, None, torch.device("cpu"))
    path = tmp_path / "sam2.1_hiera_tiny.pt"
    torch.save({"model": teacher.state_dict()}, path)
    package = build_sam2("configs/sam2.1/sam2.1_hiera_t.yaml", str(path), device="cpu")
    reloaded = build_sam("sam2.1_hiera_t", checkpoint=path)
    assert all(torch.equal(v, reloaded.state_dict()[k]) for k, v in teacher.state_dict().items())

    image = non_square_image(768, 1152, seed=4)
    predictor = SAM2ImagePredictor(package)
    predictor.set_image(image)
    features = encode_images(teacher, preprocess_square(image, 1024)[None])
    torch.testing.assert_close(
        features.image_embed, predictor._features["image_embed"], rtol=0, atol=1e-5
    )
    for ours, theirs in zip(features.high_res, predictor._features["high_res_feats"], strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)

    box = BOX * 8
    points, labels = POINTS * 8, LABELS
    cases = [
        (ObjectPrompts(boxes=torch.tensor(box[None], dtype=torch.float32)), {"box": box}),
        (
            ObjectPrompts(
                point_coords=torch.tensor(points[None], dtype=torch.float32),
                point_labels=torch.tensor(labels[None]),
            ),
            {"point_coords": points, "point_labels": labels},
        ),
    ]
    for prompts, arguments in cases:
        for multimask in (False, True):
            masks, iou, low_res = predictor.predict(**arguments, multimask_output=multimask)
            ours = predict_masks(teacher, features, prompts, (768, 1152), multimask)
            agree = (ours.masks[0] == torch.from_numpy(masks).bool()).float().mean()
            assert agree > 1 - 1e-4  # a logit within 1e-4 of 0 may fall either side
            torch.testing.assert_close(
                ours.iou_predictions[0], torch.from_numpy(iou), rtol=0, atol=1e-4
            )
            torch.testing.assert_close(
                ours.low_res_logits[0], torch.from_numpy(low_res), rtol=0, atol=1e-4
            )
