"""The parity check of `samkd export`: fp32 within its tolerances, int8 reported."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from segment_anything.utils.onnx import SamOnnxModel
from segment_anything.utils.transforms import ResizeLongestSide as SamResizeLongestSide

from samkd.data import build_dataset
from samkd.errors import UsageError
from samkd.evaluate.predict import ObjectPrompts
from samkd.export import OnnxSam, ParityError, ParityReport
from samkd.export.onnx import export_decoder
from samkd.export.parity import check_parity, check_tolerances, pytorch_reference
from samkd.models import build_sam
from samkd.settings import ExportSettings

from .conftest import IMAGE_SIZE, MODEL, Export

onnxruntime = pytest.importorskip("onnxruntime")

MIOU_ATOL = 0.005


def test_fp32_within_tolerances(exported: Export) -> None:
    summary = exported.summary
    fp32 = summary["parity"]["fp32"]
    tolerances = summary["tolerances"]
    assert (fp32["images"], fp32["objects"]) == (3, summary["parity"]["int8"]["objects"])
    assert fp32["objects"] > 0
    assert fp32["embedding_max_abs_diff"] <= tolerances["embedding_atol"]
    assert fp32["mask_logits_max_abs_diff"] <= tolerances["mask_logits_atol"]
    assert fp32["miou_onnx"] == pytest.approx(fp32["miou_pytorch"], abs=MIOU_ATOL)


def test_int8_is_reported(exported: Export) -> None:
    folder, summary = exported.folder, exported.summary
    int8 = summary["parity"]["int8"]
    assert int8["miou_delta"] == pytest.approx(int8["miou_onnx"] - int8["miou_pytorch"])
    names = sorted(Path(path).name for path in summary["files"])
    assert names == ["decoder.int8.onnx", "decoder.onnx", "image_encoder.int8.onnx",
                     "image_encoder.onnx"]  # fmt: skip
    assert json.loads((folder / "parity.json").read_text()) == summary


def test_int8_numbers_match_an_independent_computation(
    exported: Export, checkpoint: Path, shapes: Path
) -> None:
    """The int8 pair run by onnxruntime directly, with inputs built as segment-anything's
    predictor builds them, against segment-anything's own `SamOnnxModel` in PyTorch."""
    int8 = exported.summary["parity"]["int8"]
    model = build_sam(MODEL, image_size=IMAGE_SIZE, checkpoint=checkpoint).eval()
    reference_decoder = SamOnnxModel(model, return_single_mask=False).eval()
    encoder, decoder = (
        onnxruntime.InferenceSession(
            str(exported.folder / name), providers=["CPUExecutionProvider"]
        )
        for name in ("image_encoder.int8.onnx", "decoder.int8.onnx")
    )
    samples = list(build_dataset(shapes, image_size=IMAGE_SIZE))
    images = torch.stack([sample.image for sample in samples])
    with torch.no_grad():
        embeddings = model.image_encoder(images)
    (quantised,) = encoder.run(None, {"images": images.numpy()})
    embedding_diff = np.abs(quantised - embeddings.numpy()).max()
    transform = SamResizeLongestSide(IMAGE_SIZE)
    logits_diff, ious = 0.0, {"onnx": [], "pytorch": []}
    for sample, embedding in zip(samples, embeddings, strict=True):
        (alone,) = encoder.run(None, {"images": sample.image[None].numpy()})  # as eval runs it
        for mask in sample.masks.numpy():
            rows, columns = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
            corners = np.array([[columns[0], rows[0]], [columns[-1], rows[-1]]], np.float64)
            inputs = {
                "point_coords": transform.apply_coords(corners, mask.shape)[None].astype(
                    np.float32
                ),
                "point_labels": np.array([[2.0, 3.0]], np.float32),
                "mask_input": np.zeros((1, 1, IMAGE_SIZE // 4, IMAGE_SIZE // 4), np.float32),
                "has_mask_input": np.zeros(1, np.float32),
                "orig_im_size": np.array(mask.shape, np.float32),
            }
            with torch.no_grad():
                masks, _, low_res = reference_decoder(
                    embedding[None], *(torch.from_numpy(inputs[name]) for name in list(inputs))
                )
            _, _, onnx_low_res = decoder.run(
                None, {"image_embeddings": embedding[None].numpy(), **inputs}
            )
            logits_diff = max(logits_diff, float(np.abs(onnx_low_res - low_res.numpy()).max()))
            onnx_masks, _, _ = decoder.run(None, {"image_embeddings": alone, **inputs})
            for name, predicted in (
                ("onnx", onnx_masks[0, 0] > 0),
                ("pytorch", masks[0, 0].numpy() > 0),
            ):
                ious[name].append((predicted & mask).sum() / (predicted | mask).sum())
    assert int8["objects"] == len(ious["onnx"]) > 0
    assert int8["embedding_max_abs_diff"] == pytest.approx(embedding_diff, rel=1e-5)
    assert int8["mask_logits_max_abs_diff"] == pytest.approx(logits_diff, rel=1e-4)
    assert int8["miou_onnx"] == pytest.approx(np.mean(ious["onnx"]), abs=1e-6)
    assert int8["miou_pytorch"] == pytest.approx(np.mean(ious["pytorch"]), abs=1e-6)
    assert embedding_diff > 1e-3  # the weights are int8: not the fp32 numbers


def test_exceeded_tolerance_is_one_line() -> None:
    report = ParityReport("fp32", 1, 1, 0.5, 0.0, 0.0, 0.75, 0.75)
    with pytest.raises(ParityError) as caught:
        check_tolerances(report, ExportSettings())
    assert str(caught.value) == (
        "fp32 ONNX differs from PyTorch: embedding max abs diff 0.5 exceeds "
        "export.embedding_atol 0.001"
    )


def test_mIoU_change_is_checked() -> None:
    report = ParityReport("fp32", 1, 1, 0.0, 0.0, 0.0, 0.70, 0.75)
    with pytest.raises(ParityError, match="box mIoU change 0.05 exceeds export.miou_atol 0.005"):
        check_tolerances(report, ExportSettings())


def test_single_mask_decoder(
    exported: Export, checkpoint: Path, shapes: Path, tmp_path: Path
) -> None:
    model = build_sam(MODEL, image_size=IMAGE_SIZE, checkpoint=checkpoint)
    shutil.copy(exported.folder / "image_encoder.onnx", tmp_path)
    metadata = {"samkd.return_single_mask": "True"}
    export_decoder(model, tmp_path / "decoder.onnx", 17, True, metadata)
    single = OnnxSam.load(tmp_path)
    samples = [build_dataset(shapes, image_size=IMAGE_SIZE)[0]]
    report = check_parity(pytorch_reference(model, samples, True), single, "fp32")
    assert report.mask_logits_max_abs_diff < 1e-4
    assert report.miou_onnx is None and report.miou_delta is None
    box = ObjectPrompts(boxes=torch.tensor([[10.0, 10.0, 40.0, 30.0]]))
    with pytest.raises(UsageError, match="returns one mask"):
        single.predict(torch.zeros(1, 256, 8, 8), box, (96, 128), multimask=False)
