"""Writing a SAM model as two ONNX files.

- `image_encoder.onnx`: input `images` `B x 3 x S x S` float32, preprocessed as
  `Sam.preprocess` does (longest side resized to `S`, normalised with SAM's pixel mean and
  std, zero-padded at the bottom and right: `samkd.data.preprocess_image`); output
  `image_embeddings` `B x 256 x S/16 x S/16`. The batch axis is dynamic.
- `decoder.onnx`: segment-anything's `SamOnnxModel` (prompt encoder, mask decoder and mask
  post-processing), with the input and output names, shapes and dynamic axes of its
  `scripts/export_onnx_model.py`, so the flow of its ONNX example notebook works unchanged.

Both record what they are in their metadata (`samkd.*` keys), which `OnnxSam`
(`samkd.evaluate.onnx_session`, where the file names and keys are defined) reads back.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam
from segment_anything.utils.onnx import SamOnnxModel
from torch import nn

from samkd.errors import UsageError
from samkd.evaluate.onnx_session import DECODER_INPUTS, INT8, META_PRECISION
from samkd.files import atomic_path
from samkd.models import build_sam

ENCODER_INPUTS = ("images",)
ENCODER_OUTPUTS = ("image_embeddings",)
DECODER_OUTPUTS = ("masks", "iou_predictions", "low_res_masks")
# Dynamic axes of segment-anything's export script; the encoder adds its batch axis.
ENCODER_DYNAMIC_AXES = {"images": {0: "batch"}, "image_embeddings": {0: "batch"}}
DECODER_DYNAMIC_AXES = {"point_coords": {1: "num_points"}, "point_labels": {1: "num_points"}}
# The original size of segment-anything's example decoder input: any size other than the
# model's own makes tracing follow the crop and resize of the mask post-processing.
EXAMPLE_ORIGINAL_SIZE = (1500.0, 2250.0)
EXAMPLE_POINTS = 5
# A protobuf message (one .onnx file without external data) holds at most 2 GiB.
MAX_ONNX_BYTES = 2**31


def check_exportable(model_type: str, image_size: int) -> None:
    """Refuse an image encoder whose weights exceed one ONNX file (vit_h), before building
    it (on the meta device: no memory)."""
    model = build_sam(model_type, image_size=image_size, device="meta")
    size = sum(p.numel() * p.element_size() for p in model.image_encoder.parameters())
    if size >= MAX_ONNX_BYTES:
        raise UsageError(
            f"model type {model_type!r}: the image encoder's weights ({size / 2**30:.1f} GiB) "
            "exceed the 2 GiB of one ONNX file; export vit_b, vit_l or a student"
        )


class SamDecoderOnnxModel(SamOnnxModel):
    """segment-anything's `SamOnnxModel`, with the crop of its mask post-processing made
    from tensors.

    segment-anything 1.0 (PyPI) crops with `int(prepadded_size[0])`, which tracing turns into
    the example's size, so every other original size was cropped wrongly; its repository's
    later version slices with the tensors, as here.
    """

    def mask_postprocessing(self, masks: torch.Tensor, orig_im_size: torch.Tensor) -> torch.Tensor:
        """Low-res logits `1 x M x 4h x 4w` -> logits `1 x M x H x W` at `orig_im_size`."""
        masks = F.interpolate(
            masks, size=(self.img_size, self.img_size), mode="bilinear", align_corners=False
        )
        prepadded = self.resize_longest_image_size(orig_im_size, self.img_size)
        masks = masks[..., : prepadded[0], : prepadded[1]]
        # Tensor sizes, which tracing records as the graph's input: ints would be constants.
        original: Any = orig_im_size.to(torch.int64)
        return F.interpolate(
            masks, size=(original[0], original[1]), mode="bilinear", align_corners=False
        )


def decoder_module(model: Sam, return_single_mask: bool) -> SamOnnxModel:
    """The module exported as `decoder.onnx` (the PyTorch reference of the parity check)."""
    return SamDecoderOnnxModel(model, return_single_mask=return_single_mask).eval()


def decoder_example_inputs(model: Sam) -> dict[str, torch.Tensor]:
    """Example decoder inputs, as segment-anything's export script makes them."""
    embed_size = model.prompt_encoder.image_embedding_size
    size = model.image_encoder.img_size
    generator = torch.Generator().manual_seed(0)
    return {
        "image_embeddings": torch.randn(
            1, model.prompt_encoder.embed_dim, *embed_size, generator=generator
        ),
        "point_coords": torch.randint(0, size, (1, EXAMPLE_POINTS, 2), generator=generator).float(),
        "point_labels": torch.randint(0, 4, (1, EXAMPLE_POINTS), generator=generator).float(),
        "mask_input": torch.randn(1, 1, *(4 * side for side in embed_size), generator=generator),
        "has_mask_input": torch.tensor([1.0]),
        "orig_im_size": torch.tensor(EXAMPLE_ORIGINAL_SIZE),
    }


def export_image_encoder(model: Sam, path: Path, opset: int, metadata: Mapping[str, str]) -> None:
    """Write `model.image_encoder` to `path` (see the module docstring for its signature)."""
    size = model.image_encoder.img_size
    example = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    write_onnx(
        model.image_encoder,
        (example,),
        path,
        opset,
        ENCODER_INPUTS,
        ENCODER_OUTPUTS,
        ENCODER_DYNAMIC_AXES,
        metadata,
    )


def export_decoder(
    model: Sam, path: Path, opset: int, return_single_mask: bool, metadata: Mapping[str, str]
) -> None:
    """Write segment-anything's ONNX decoder of `model` to `path`."""
    example = decoder_example_inputs(model)
    write_onnx(
        decoder_module(model, return_single_mask),
        tuple(example[name] for name in DECODER_INPUTS),
        path,
        opset,
        DECODER_INPUTS,
        DECODER_OUTPUTS,
        DECODER_DYNAMIC_AXES,
        metadata,
    )


def write_onnx(
    module: nn.Module,
    example: tuple[torch.Tensor, ...],
    path: Path,
    opset: int,
    input_names: tuple[str, ...],
    output_names: tuple[str, ...],
    dynamic_axes: Mapping[str, Mapping[int, str]],
    metadata: Mapping[str, str],
) -> None:
    """Trace `module` on `example` into an ONNX file with `metadata`, written under a
    temporary name and renamed."""
    import onnx

    with atomic_path(path, suffix=".onnx") as temporary:
        with warnings.catch_warnings(), torch.no_grad():
            # Tracing warns about every Python-level shape computation, which it records.
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            # The tracing exporter is deprecated, but it is the one segment-anything's decoder
            # and dynamic axes were written for, and it needs no onnxscript.
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            # About negative indices, which the single-mask choice (arange, argmax) never has.
            warnings.filterwarnings("ignore", message="Exporting aten::index operator")
            torch.onnx.export(
                module,
                example,
                temporary,
                export_params=True,
                opset_version=opset,
                do_constant_folding=True,
                input_names=list(input_names),
                output_names=list(output_names),
                dynamic_axes={name: dict(axes) for name, axes in dynamic_axes.items()},
                dynamo=False,
            )
        proto = onnx.load(str(temporary))
        onnx.helper.set_model_props(proto, dict(metadata))
        onnx.save(proto, str(temporary))


def quantize_int8(source: Path, target: Path) -> None:
    """onnxruntime's dynamic quantisation of `source`'s weights to uint8, as segment-anything's
    export script does it; the metadata is kept, its precision set to int8."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    proto = onnx.load(str(source))
    unshare_initializers(proto)
    with atomic_path(target, suffix=".onnx") as temporary, _root_warnings_off():
        quantize_dynamic(proto, temporary, per_channel=False, weight_type=QuantType.QUInt8)
        quantized = onnx.load(str(temporary))
        metadata = {prop.key: prop.value for prop in quantized.metadata_props}
        onnx.helper.set_model_props(quantized, {**metadata, META_PRECISION: INT8})
        onnx.save(quantized, str(temporary))


def unshare_initializers(proto: Any) -> None:
    """Give each weight that the exporter shares through an `Identity` node its own copy.

    The exporter stores equal tensors once (zero-initialised weights, for example) and reads
    the others through `Identity`; onnxruntime's quantiser needs every Conv and MatMul
    weight to be an initializer itself.
    """
    import onnx

    initializers = {tensor.name: tensor for tensor in proto.graph.initializer}
    kept = []
    for node in proto.graph.node:
        if node.op_type == "Identity" and node.input[0] in initializers:
            copy = onnx.TensorProto()
            copy.CopyFrom(initializers[node.input[0]])
            copy.name = node.output[0]
            proto.graph.initializer.append(copy)
        else:
            kept.append(node)
    del proto.graph.node[:]
    proto.graph.node.extend(kept)


@contextmanager
def _root_warnings_off() -> Iterator[None]:
    """onnxruntime's quantiser logs advice, and every tensor it leaves in float, as warnings
    on the root logger: silenced while it runs, restored after."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)
