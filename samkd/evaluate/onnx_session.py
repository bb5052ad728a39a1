"""Exported ONNX pairs (`samkd export`): their files and metadata, and `OnnxSam`, which runs
an encoder and decoder with onnxruntime and is measured like a PyTorch `Sam`.

The export (`samkd.export`) writes what this module reads; both take the file names, input
names and metadata keys from here. onnx and onnxruntime (`pip install samkd[export]`) are
imported only when used.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from samkd.data.images import ResizeLongestSide
from samkd.errors import UsageError
from samkd.evaluate.predict import MaskPrediction, ObjectPrompts
from samkd.evaluate.speed import SpeedReport, time_calls

if TYPE_CHECKING:
    from onnxruntime import InferenceSession

ENCODER_FILE = "image_encoder.onnx"
DECODER_FILE = "decoder.onnx"
INT8 = "int8"
DECODER_INPUTS = (
    "image_embeddings",
    "point_coords",
    "point_labels",
    "mask_input",
    "has_mask_input",
    "orig_im_size",
)
EXPORT_EXTRA = "pip install samkd[export]"

META_MODEL_TYPE = "samkd.model_type"
META_IMAGE_SIZE = "samkd.image_size"
META_SINGLE_MASK = "samkd.return_single_mask"
META_PRECISION = "samkd.precision"
META_VERSION = "samkd.version"

# `Sam.mask_threshold`: mask logits above it are foreground.
MASK_THRESHOLD = 0.0
# SAM's point labels: -1 marks the padding point added when there is no box; 2 and 3 the
# top-left and bottom-right box corners.
PAD_LABEL = -1.0
BOX_CORNER_LABELS = (2.0, 3.0)
UNKNOWN = "unknown"


@dataclass(frozen=True)
class OnnxFiles:
    """The encoder and decoder files of one export (fp32, or a quantised variant)."""

    encoder: Path
    decoder: Path

    @classmethod
    def in_folder(cls, folder: Path, variant: str = "") -> OnnxFiles:
        """`image_encoder.onnx` and `decoder.onnx` in `folder`, or `*.<variant>.onnx`."""
        suffix = f".{variant}.onnx" if variant else ".onnx"
        return cls(
            folder / ENCODER_FILE.replace(".onnx", suffix),
            folder / DECODER_FILE.replace(".onnx", suffix),
        )

    @classmethod
    def of(cls, path: Path) -> OnnxFiles:
        """The pair that `path` names: an export folder (its fp32 files), or one of its
        `image_encoder*.onnx` files with the `decoder*.onnx` of the same variant beside it."""
        if path.is_dir():
            return cls.in_folder(path)
        stem = ENCODER_FILE.removesuffix(".onnx")
        if not (path.name.startswith(stem) and path.suffix == ".onnx"):
            raise UsageError(f"{path}: expected a samkd export folder or its {stem}*.onnx file")
        variant = path.name.removeprefix(stem).removesuffix(".onnx").lstrip(".")
        return cls.in_folder(path.parent, variant)

    def check_exist(self) -> None:
        for path in (self.encoder, self.decoder):
            if not path.is_file():
                raise UsageError(f"{path} does not exist; write it with samkd export")


def require_export_extra() -> None:
    """A one-line `UsageError` naming the `export` extra when onnx or onnxruntime is missing."""
    for module in ("onnx", "onnxruntime"):
        try:
            importlib.import_module(module)
        except ImportError:
            raise UsageError(
                f"{module} is not installed; ONNX export and evaluation need the export "
                f"extra: {EXPORT_EXTRA}"
            ) from None


@dataclass(frozen=True)
class ExportInfo:
    """What an exported pair is: the model type it came from (metadata), its input side `S`
    (the encoder's input shape), whether its decoder returns one mask, and its precision."""

    model_type: str
    image_size: int
    return_single_mask: bool
    precision: str


class OnnxSam:
    """An exported image encoder and decoder run on the CPU by onnxruntime.

    `encode` and `predict` mirror `samkd.evaluate.predict.encode_images` and `predict_masks`,
    so `samkd eval` measures it where it measures a PyTorch model.
    """

    device = torch.device("cpu")

    def __init__(
        self, files: OnnxFiles, encoder: InferenceSession, decoder: InferenceSession
    ) -> None:
        self.files = files
        self.encoder = encoder
        self.decoder = decoder
        self.info = _read_info(files, encoder, decoder)

    @classmethod
    def load(cls, path: Path) -> OnnxSam:
        """The pair that `path` names (see `OnnxFiles.of`)."""
        require_export_extra()
        import onnxruntime

        files = OnnxFiles.of(path)
        files.check_exist()
        sessions = []
        for file in (files.encoder, files.decoder):
            try:
                sessions.append(
                    onnxruntime.InferenceSession(str(file), providers=["CPUExecutionProvider"])
                )
            # onnxruntime reports an unreadable or invalid model with its own error types.
            except Exception as error:
                reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
                raise UsageError(f"{file}: onnxruntime cannot load it: {reason}") from None
        return cls(files, *sessions)

    @property
    def image_size(self) -> int:
        return self.info.image_size

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Image embeddings `B x 256 x S/16 x S/16` of preprocessed images `B x 3 x S x S`."""
        array = images.detach().to("cpu", torch.float32).numpy()
        (embeddings,) = self.encoder.run(None, {self.encoder.get_inputs()[0].name: array})
        return torch.from_numpy(embeddings)

    def decoder_inputs(
        self,
        image_embedding: torch.Tensor,
        prompts: ObjectPrompts,
        index: int,
        original_size: tuple[int, int],
    ) -> dict[str, np.ndarray]:
        """See `decoder_inputs`."""
        return decoder_inputs(image_embedding, prompts, index, original_size, self.image_size)

    def run_decoder(self, inputs: dict[str, np.ndarray]) -> tuple[torch.Tensor, ...]:
        """`masks` `1 x M x H x W` logits, `iou_predictions` `1 x M`, `low_res_masks`
        `1 x M x 4h x 4w` (M = 4: the single-mask output, then the three multimask ones;
        1 with a single-mask decoder)."""
        outputs = self.decoder.run(None, {name: inputs[name] for name in DECODER_INPUTS})
        return tuple(torch.from_numpy(output) for output in outputs[:3])

    def predict(
        self,
        image_embedding: torch.Tensor,
        prompts: ObjectPrompts,
        original_size: tuple[int, int],
        multimask: bool,
    ) -> MaskPrediction:
        """Masks for every prompt of one image, as `predict_masks` returns them: the three
        multimask outputs, or the single-mask one."""
        if self.info.return_single_mask:
            raise UsageError(
                f"{self.files.decoder} returns one mask (exported with "
                "export.return_single_mask); evaluation needs all four: export again with "
                "--set export.return_single_mask=false"
            )
        chosen = slice(1, None) if multimask else slice(0, 1)
        masks, scores, logits = [], [], []
        for index in range(len(prompts)):
            inputs = self.decoder_inputs(image_embedding, prompts, index, original_size)
            upscaled, iou, low_res = self.run_decoder(inputs)
            masks.append(upscaled[:, chosen] > MASK_THRESHOLD)
            scores.append(iou[:, chosen])
            logits.append(low_res[:, chosen])
        return MaskPrediction(torch.cat(masks), torch.cat(scores), torch.cat(logits))


def decoder_inputs(
    image_embedding: torch.Tensor,
    prompts: ObjectPrompts,
    index: int,
    original_size: tuple[int, int],
    image_size: int,
) -> dict[str, np.ndarray]:
    """The official decoder inputs for object `index` of `prompts` (original-image
    coordinates) on `image_embedding` `1 x 256 x h x w` of a model with input side
    `image_size`.

    As `Sam`'s prompt encoder: points first, then the box as two corner points (labels 2 and
    3); a padding point (label -1) when there is no box.
    """
    transform = ResizeLongestSide(image_size)
    coords, labels = [], []
    if prompts.point_coords is not None and prompts.point_labels is not None:
        points = prompts.point_coords[index].float()
        coords.append(transform.apply_coords_torch(points, original_size))
        labels.append(prompts.point_labels[index].float())
    if prompts.boxes is not None:
        box = prompts.boxes[index : index + 1].float()
        coords.append(transform.apply_boxes_torch(box, original_size).reshape(2, 2))
        labels.append(torch.tensor(BOX_CORNER_LABELS))
    else:
        coords.append(torch.zeros(1, 2))
        labels.append(torch.tensor([PAD_LABEL]))
    embed_side = image_embedding.shape[-1]
    return {
        "image_embeddings": image_embedding.detach().to("cpu", torch.float32).numpy(),
        "point_coords": torch.cat(coords)[None].numpy(),
        "point_labels": torch.cat(labels)[None].numpy(),
        "mask_input": np.zeros((1, 1, 4 * embed_side, 4 * embed_side), np.float32),
        "has_mask_input": np.zeros(1, np.float32),
        "orig_im_size": np.array(original_size, np.float32),
    }


def _read_info(files: OnnxFiles, encoder: Any, decoder: Any) -> ExportInfo:
    """The pair's description; the image size from the encoder's input, which must be
    square and fixed."""
    shape = encoder.get_inputs()[0].shape
    if len(shape) != 4 or not isinstance(shape[-1], int) or shape[-1] != shape[-2]:
        raise UsageError(
            f"{files.encoder}: expected an input of B x 3 x S x S images, got shape {shape}"
        )
    names = [node.name for node in decoder.get_inputs()]
    if names != list(DECODER_INPUTS):
        raise UsageError(
            f"{files.decoder}: expected the inputs {', '.join(DECODER_INPUTS)}, got "
            f"{', '.join(names)}"
        )
    metadata = decoder.get_modelmeta().custom_metadata_map
    return ExportInfo(
        model_type=metadata.get(META_MODEL_TYPE, UNKNOWN),
        image_size=int(shape[-1]),
        return_single_mask=metadata.get(META_SINGLE_MASK, "False") == "True",
        precision=metadata.get(META_PRECISION, UNKNOWN),
    )


def measure_onnx_speed(model: OnnxSam, batch_size: int, warmup: int, repeats: int) -> SpeedReport:
    """`measure_speed` of an exported pair: encoder latency (batch 1) and throughput
    (`batch_size`), decoder latency for one box."""
    size = model.image_size
    single = torch.randn(1, 3, size, size)
    batch = torch.randn(batch_size, 3, size, size)
    cpu = model.device
    latency = time_calls(lambda: model.encode(single), cpu, warmup, repeats)
    batched = time_calls(lambda: model.encode(batch), cpu, warmup, max(1, repeats // 2))
    box = ObjectPrompts(boxes=torch.tensor([[size * 0.25, size * 0.25, size * 0.75, size * 0.75]]))
    inputs = model.decoder_inputs(model.encode(single), box, 0, (size, size))
    decoder = time_calls(lambda: model.run_decoder(inputs), cpu, warmup, repeats)
    return SpeedReport(
        device=f"{cpu} (onnxruntime)",
        image_size=size,
        encoder_latency=latency,
        encoder_batch_size=batch_size,
        encoder_images_per_s=batch_size / batched.median_s,
        decoder_latency_per_prompt=decoder,
    )
