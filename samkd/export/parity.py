"""How closely an exported pair reproduces the PyTorch model it came from."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from segment_anything.modeling import Sam

from samkd.data import Sample
from samkd.evaluate.metrics import mask_iou
from samkd.evaluate.onnx_session import DECODER_INPUTS, OnnxSam, decoder_inputs
from samkd.evaluate.predict import PromptableModel, encode_images, predict_masks
from samkd.evaluate.prompts import box_prompts
from samkd.export.onnx import decoder_module
from samkd.runtime import progress_bar
from samkd.settings import ExportSettings


class ParityError(ValueError):
    """The fp32 export differs from PyTorch by more than a tolerance; one-line message."""


@dataclass(frozen=True)
class DecoderCall:
    """One box prompt in the official decoder inputs, and PyTorch's outputs for it:
    `iou_predictions` `1 x M`, `low_res_masks` `1 x M x 4h x 4w`."""

    inputs: dict[str, np.ndarray]
    iou_predictions: torch.Tensor
    low_res_masks: torch.Tensor


@dataclass(frozen=True)
class PytorchReference:
    """What the PyTorch model gives on the parity samples, computed once for every exported
    pair: image embeddings `B x 256 x h x w`, decoder outputs for the box of every object
    (segment-anything's `SamOnnxModel` run in PyTorch: the module that was exported), and
    the box-prompt single-output IoU of every object against its ground truth."""

    samples: Sequence[Sample]
    embeddings: torch.Tensor
    decoder_calls: list[DecoderCall]
    box_ious: list[float]


@dataclass(frozen=True)
class ParityReport:
    """Differences of one exported pair (`precision` fp32 or int8) from PyTorch.

    `*_max_abs_diff`: the largest |ONNX - PyTorch| over `images` images (embeddings) and the
    box prompts of their `objects` objects (decoder outputs, both decoders given the PyTorch
    embedding, so they measure the decoder alone). `miou_*`: box-prompt single-output mIoU
    against the ground-truth masks of each end to end (None without objects, or with a
    single-mask decoder, whose choice of mask `samkd eval` does not measure).
    """

    precision: str
    images: int
    objects: int
    embedding_max_abs_diff: float
    mask_logits_max_abs_diff: float
    iou_predictions_max_abs_diff: float
    miou_onnx: float | None
    miou_pytorch: float | None

    @property
    def miou_delta(self) -> float | None:
        """mIoU of the export minus that of PyTorch."""
        if self.miou_onnx is None or self.miou_pytorch is None:
            return None
        return self.miou_onnx - self.miou_pytorch

    def to_dict(self) -> dict[str, object]:
        return {**asdict(self), "miou_delta": self.miou_delta}


def pytorch_reference(
    model: Sam, samples: Sequence[Sample], return_single_mask: bool
) -> PytorchReference:
    """Run `model` (on the CPU) over `samples`: all images in one batch, then the box of
    every object."""
    embeddings = encode_images(model, torch.stack([sample.image for sample in samples]))
    decoder = decoder_module(model, return_single_mask)
    image_size = model.image_encoder.img_size
    calls, ious = [], []
    for sample, embedding in zip(samples, embeddings, strict=True):
        prompts = box_prompts(sample.masks)
        for index in range(len(prompts)):
            inputs = decoder_inputs(
                embedding[None], prompts, index, sample.original_size, image_size
            )
            with torch.inference_mode():
                _, iou, low_res = decoder(
                    *(torch.from_numpy(inputs[name]) for name in DECODER_INPUTS)
                )
            calls.append(DecoderCall(inputs, iou, low_res))
        if len(prompts) and not return_single_mask:
            ious += _box_ious(model, embedding, sample)
    return PytorchReference(samples, embeddings, calls, ious)


def check_parity(reference: PytorchReference, exported: OnnxSam, precision: str) -> ParityReport:
    """Compare `exported` with the PyTorch `reference`: embeddings of all images at once (the
    batch axis is dynamic), decoder outputs and mIoU (end to end, one image at a time) for
    box prompts of every object."""
    samples = reference.samples
    with progress_bar() as progress:
        task = progress.add_task(f"parity {precision}", total=len(samples) + 1)
        embeddings = exported.encode(torch.stack([sample.image for sample in samples]))
        progress.advance(task)
        logits_diff = iou_diff = 0.0
        for call in reference.decoder_calls:
            _, iou, low_res = exported.run_decoder(call.inputs)
            logits_diff = max(logits_diff, _max_abs_diff(low_res, call.low_res_masks))
            iou_diff = max(iou_diff, _max_abs_diff(iou, call.iou_predictions))
        ious: list[float] = []
        for sample in samples:
            if sample.masks.shape[0] and not exported.info.return_single_mask:
                # One image at a time, as `samkd eval` runs it: int8 activations are
                # quantised with the range of the whole batch, so results depend on it.
                embedding = encode_images(exported, sample.image[None])[0]
                ious += _box_ious(exported, embedding, sample)
            progress.advance(task)
    return ParityReport(
        precision=precision,
        images=len(samples),
        objects=sum(sample.masks.shape[0] for sample in samples),
        embedding_max_abs_diff=_max_abs_diff(embeddings, reference.embeddings),
        mask_logits_max_abs_diff=logits_diff,
        iou_predictions_max_abs_diff=iou_diff,
        miou_onnx=_mean(ious),
        miou_pytorch=_mean(reference.box_ious),
    )


def check_tolerances(report: ParityReport, tolerances: ExportSettings) -> None:
    """Raise `ParityError` naming the first quantity of `report` beyond its tolerance."""
    checks = (
        ("embedding max abs diff", report.embedding_max_abs_diff, "embedding_atol"),
        ("mask logits max abs diff", report.mask_logits_max_abs_diff, "mask_logits_atol"),
        ("box mIoU change", None if report.miou_delta is None else abs(report.miou_delta),
         "miou_atol"),
    )  # fmt: skip
    for quantity, value, key in checks:
        tolerance = getattr(tolerances, key)
        if value is not None and not value <= tolerance:
            raise ParityError(
                f"{report.precision} ONNX differs from PyTorch: {quantity} {value:.3g} exceeds "
                f"export.{key} {tolerance:g}"
            )


def _box_ious(model: PromptableModel, embedding: torch.Tensor, sample: Sample) -> list[float]:
    """IoUs of the single-output masks for the boxes of `sample`'s objects, as `samkd eval`
    measures them (`embedding`: `256 x h x w`)."""
    prediction = predict_masks(
        model, embedding[None], box_prompts(sample.masks), sample.original_size, multimask=False
    )
    return mask_iou(prediction.masks[:, 0], sample.masks).tolist()


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _max_abs_diff(actual: torch.Tensor, expected: torch.Tensor) -> float:
    if actual.shape != expected.shape:
        raise ParityError(
            f"ONNX output of shape {tuple(actual.shape)}, PyTorch {tuple(expected.shape)}"
        )
    return float((actual.float() - expected.float()).abs().max()) if actual.numel() else 0.0
