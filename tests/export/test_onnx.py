"""The files `samkd export` writes: names, shapes and dynamic axes of segment-anything's
ONNX example, opset, metadata."""

from pathlib import Path
from typing import Any

import pytest
import torch

from samkd.data.images import ResizeLongestSide
from samkd.errors import UsageError
from samkd.evaluate.predict import ObjectPrompts, predict_masks
from samkd.export import OnnxFiles, OnnxSam
from samkd.export.onnx import DECODER_INPUTS, DECODER_OUTPUTS, quantize_int8, write_onnx
from samkd.models import build_sam

from .conftest import IMAGE_SIZE, MODEL, Export

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")

EMBED = IMAGE_SIZE // 16


def signature(path: Path) -> tuple[dict[str, list[Any]], dict[str, list[Any]]]:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inputs = {node.name: node.shape for node in session.get_inputs()}
    outputs = {node.name: node.shape for node in session.get_outputs()}
    return inputs, outputs


def test_encoder_signature(exported: Export) -> None:
    inputs, outputs = signature(exported.folder / "image_encoder.onnx")
    assert inputs == {"images": ["batch", 3, IMAGE_SIZE, IMAGE_SIZE]}
    assert outputs == {"image_embeddings": ["batch", 256, EMBED, EMBED]}


def test_decoder_has_segment_anythings_signature(exported: Export) -> None:
    inputs, outputs = signature(exported.folder / "decoder.onnx")
    assert list(inputs) == list(DECODER_INPUTS)
    assert inputs["image_embeddings"] == [1, 256, EMBED, EMBED]
    assert inputs["point_coords"] == [1, "num_points", 2]
    assert inputs["point_labels"] == [1, "num_points"]
    assert inputs["mask_input"] == [1, 1, 4 * EMBED, 4 * EMBED]
    assert inputs["has_mask_input"] == [1]
    assert inputs["orig_im_size"] == [2]
    assert list(outputs) == list(DECODER_OUTPUTS)
    assert outputs["iou_predictions"][-1] == 4  # the single-mask output and three others


@pytest.mark.parametrize("name", ["image_encoder", "decoder"])
def test_opset_and_metadata(exported: Export, name: str) -> None:
    for suffix, precision in ((".onnx", "fp32"), (".int8.onnx", "int8")):
        proto = onnx.load(str(exported.folder / f"{name}{suffix}"))
        opsets = {entry.domain: entry.version for entry in proto.opset_import}
        assert opsets[""] >= 17
        metadata = {prop.key: prop.value for prop in proto.metadata_props}
        assert metadata["samkd.model_type"] == MODEL
        assert metadata["samkd.image_size"] == str(IMAGE_SIZE)
        assert metadata["samkd.precision"] == precision


@pytest.mark.parametrize(
    "original_size", [(50, 300), (300, 50), (900, 1300)], ids=["wide", "tall", "large"]
)
def test_decoder_crops_to_any_original_size(
    exported: Export, checkpoint: Path, original_size: tuple[int, int]
) -> None:
    """The decoder's masks are its low-resolution logits as `Sam.postprocess_masks` brings
    them to the original size: upscaled, cropped to the unpadded image, resized (the 1.0
    release of segment-anything cropped every size as the example's)."""
    model = OnnxSam.load(exported.folder)
    embedding = torch.randn(1, 256, EMBED, EMBED, generator=torch.Generator().manual_seed(1))
    height, width = original_size
    box = ObjectPrompts(
        boxes=torch.tensor([[0.2 * width, 0.2 * height, 0.6 * width, 0.7 * height]])
    )
    masks, _, low_res = model.run_decoder(model.decoder_inputs(embedding, box, 0, original_size))
    assert masks.shape == (1, 4, *original_size)
    assert low_res.shape == (1, 4, 4 * EMBED, 4 * EMBED)
    sam = build_sam(MODEL, image_size=IMAGE_SIZE, checkpoint=checkpoint)
    input_size = ResizeLongestSide(IMAGE_SIZE).get_preprocess_shape(height, width, IMAGE_SIZE)
    with torch.no_grad():
        expected = sam.postprocess_masks(low_res, input_size, original_size)
    torch.testing.assert_close(masks, expected, atol=1e-3, rtol=1e-4)
    assert ((masks > 0) == (expected > 0)).float().mean() > 0.999


def test_files_of_a_folder_or_an_encoder_file(tmp_path: Path) -> None:
    assert OnnxFiles.of(tmp_path) == OnnxFiles(
        tmp_path / "image_encoder.onnx", tmp_path / "decoder.onnx"
    )
    int8 = OnnxFiles.of(tmp_path / "image_encoder.int8.onnx")
    assert int8.decoder == tmp_path / "decoder.int8.onnx"
    with pytest.raises(UsageError, match="expected a samkd export folder"):
        OnnxFiles.of(tmp_path / "model.pt")


def test_point_prompts_match_pytorch(exported: Export, checkpoint: Path) -> None:
    model = build_sam(MODEL, image_size=IMAGE_SIZE, checkpoint=checkpoint)
    onnx_model = OnnxSam.load(exported.folder)
    embedding = torch.randn(1, 256, EMBED, EMBED, generator=torch.Generator().manual_seed(0))
    prompts = ObjectPrompts(
        point_coords=torch.tensor([[[30.0, 40.0], [60.0, 20.0]], [[5.0, 90.0], [0.0, 0.0]]]),
        point_labels=torch.tensor([[1, 0], [1, -1]]),
    )
    for multimask in (False, True):
        ours = predict_masks(onnx_model, embedding, prompts, (96, 128), multimask)
        theirs = predict_masks(model, embedding, prompts, (96, 128), multimask)
        assert torch.allclose(ours.low_res_logits, theirs.low_res_logits, atol=1e-4)
        assert torch.allclose(ours.iou_predictions, theirs.iou_predictions, atol=1e-5)


def test_int8_quantises_weights_the_exporter_shares(tmp_path: Path) -> None:
    """Equal weights (here zero-initialised, as in a new model) are stored once and read
    through Identity nodes, which onnxruntime's quantiser refuses unless unshared."""
    layers = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)).eval()
    for layer in layers:
        torch.nn.init.zeros_(layer.weight)
    fp32, int8 = tmp_path / "model.onnx", tmp_path / "model.int8.onnx"
    write_onnx(
        layers, (torch.randn(2, 8),), fp32, 17, ("x",), ("y",), {}, {"samkd.precision": "fp32"}
    )
    assert "Identity" in {node.op_type for node in onnx.load(str(fp32)).graph.node}
    quantize_int8(fp32, int8)
    quantized = onnx.load(str(int8))
    metadata = {prop.key: prop.value for prop in quantized.metadata_props}
    assert metadata["samkd.precision"] == "int8"
    assert "MatMulInteger" in {node.op_type for node in quantized.graph.node}
