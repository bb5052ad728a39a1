"""The parity check of `samkd export`: fp32 within its tolerances, int8 reported."""

import json
from pathlib import Path

import pytest

from samkd.export import ParityError, ParityReport
from samkd.export.parity import check_tolerances
from samkd.settings import ExportSettings

from .conftest import Export

pytest.importorskip("onnxruntime")

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
    assert int8["embedding_max_abs_diff"] > 0
    names = sorted(Path(path).name for path in summary["files"])
    assert names == ["decoder.int8.onnx", "decoder.onnx", "image_encoder.int8.onnx",
                     "image_encoder.onnx"]  # fmt: skip
    assert json.loads((folder / "parity.json").read_text()) == summary


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
