"""`samkd export`: write a model as ONNX and check the files against PyTorch."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from loguru import logger
from rich.console import Console
from rich.table import Table
from segment_anything.modeling import Sam

from samkd import __version__
from samkd.data import Sample, build_dataset
from samkd.demo.shapes import write_shapes_dataset
from samkd.errors import UsageError
from samkd.evaluate.onnx_session import (
    INT8,
    META_IMAGE_SIZE,
    META_MODEL_TYPE,
    META_PRECISION,
    META_SINGLE_MASK,
    META_VERSION,
    OnnxFiles,
    OnnxSam,
    require_export_extra,
)
from samkd.evaluate.spec import (
    RUN_SETTINGS,
    RUN_WEIGHTS,
    ModelSpec,
    load_eval_dataset,
    student_spec,
)
from samkd.export.onnx import (
    check_exportable,
    export_decoder,
    export_image_encoder,
    quantize_int8,
)
from samkd.export.parity import (
    ParityReport,
    check_parity,
    check_tolerances,
    pytorch_reference,
)
from samkd.files import check_writable, write_json
from samkd.settings import ExportSettings, Settings

PARITY_FILE = "parity.json"
FP32 = "fp32"
# Generated parity images are 3:4, so the padding and the crop back to the original size
# take part in the check.
GENERATED_ASPECT = 3 / 4
GENERATED_SEED = 0
CPU = torch.device("cpu")


def model_to_export(settings: Settings, source: Path | None) -> ModelSpec:
    """What `source` names: a training run folder (its `student.pt`), or a checkpoint (a run's
    checkpoint or `student.pt` is exported as the run trained it: see `student_spec`), or,
    without it, `student.checkpoint` (random weights when unset)."""
    if source is not None and source.is_dir():
        weights = source / RUN_WEIGHTS
        if not (source / RUN_SETTINGS).is_file():
            raise UsageError(f"{source}: not a training run folder (no {RUN_SETTINGS})")
        if not weights.is_file():
            raise UsageError(f"{source}: no {RUN_WEIGHTS}; the run has not finished")
        return student_spec(settings, weights)
    if source is not None and not source.is_file():
        raise UsageError(f"{source}: no such training run folder or checkpoint")
    return student_spec(settings, source)


@contextmanager
def parity_samples(settings: Settings, image_size: int) -> Iterator[list[Sample]]:
    """The first `export.parity_images` samples of the dataset in the settings (`--data`), or
    of generated shapes while the block runs."""
    count = settings.export.parity_images
    if settings.data.val or settings.data.train:
        dataset = load_eval_dataset(settings, image_size)
        yield [dataset[index] for index in range(min(count, len(dataset)))]
        return
    with tempfile.TemporaryDirectory(prefix="samkd-parity-") as folder:
        size = (round(image_size * GENERATED_ASPECT), image_size)
        root = write_shapes_dataset(Path(folder) / "shapes", count, size, seed=GENERATED_SEED)
        dataset = build_dataset(root, image_size=image_size)
        yield [dataset[index] for index in range(len(dataset))]


def write_pair(model: Sam, spec: ModelSpec, settings: Settings, console: Console) -> OnnxFiles:
    """Write the fp32 encoder and decoder of `model` into `export.output`."""
    export = settings.export
    files = OnnxFiles.in_folder(export.output)
    metadata = {
        META_MODEL_TYPE: spec.model_type,
        META_IMAGE_SIZE: str(spec.image_size),
        META_SINGLE_MASK: str(export.return_single_mask),
        META_PRECISION: FP32,
        META_VERSION: __version__,
    }
    with console.status(f"writing {files.encoder}"):
        export_image_encoder(model, files.encoder, export.opset, metadata)
    with console.status(f"writing {files.decoder}"):
        export_decoder(model, files.decoder, export.opset, export.return_single_mask, metadata)
    return files


def write_int8_pair(files: OnnxFiles, folder: Path, console: Console) -> OnnxFiles:
    """Write the `*.int8.onnx` copies of `files` into `folder`."""
    quantized = OnnxFiles.in_folder(folder, INT8)
    with console.status(f"quantising to {quantized.encoder.name} and {quantized.decoder.name}"):
        quantize_int8(files.encoder, quantized.encoder)
        quantize_int8(files.decoder, quantized.decoder)
    return quantized


def run_export(
    settings: Settings, source: Path | None = None, console: Console | None = None
) -> dict[str, Any]:
    """Export the model that `source` names (see `model_to_export`) to `export.output`,
    check the files against PyTorch, write `parity.json`; returns its content.

    Raises `ParityError` when the fp32 files exceed a tolerance of `export` (the files and
    `parity.json` are written first, to look at).
    """
    console = console or Console()
    require_export_extra()
    export = settings.export
    check_writable(export.output, "export.output")
    spec = model_to_export(settings, source)
    if spec.checkpoint is None:
        logger.warning("exporting random weights: no checkpoint given (student.checkpoint)")
    written: list[OnnxFiles] = []
    with parity_samples(settings, spec.image_size) as samples:
        check_exportable(spec.model_type, spec.image_size)
        model = spec.build(CPU)
        files = write_pair(model, spec, settings, console)
        written.append(files)
        reference = pytorch_reference(model, samples, export.return_single_mask)
        reports = [check_parity(reference, OnnxSam.load(files.encoder), FP32)]
        if export.quantize == INT8:
            quantized = write_int8_pair(files, export.output, console)
            written.append(quantized)
            reports.append(check_parity(reference, OnnxSam.load(quantized.encoder), INT8))
    summary = {
        "samkd_version": __version__,
        "model": spec.to_dict(),
        "opset": export.opset,
        "return_single_mask": export.return_single_mask,
        "data": str(settings.data.val or settings.data.train or "generated shapes"),
        "tolerances": {
            key: getattr(export, key) for key in ("embedding_atol", "mask_logits_atol", "miou_atol")
        },
        "parity": {report.precision: report.to_dict() for report in reports},
        "files": [str(path) for pair in written for path in (pair.encoder, pair.decoder)],
    }
    write_json(summary, export.output / PARITY_FILE)
    console.print(parity_table(reports, export))
    console.print(f"wrote {files.encoder}, {files.decoder} and {export.output / PARITY_FILE}")
    check_tolerances(reports[0], export)
    return summary


def parity_table(reports: list[ParityReport], tolerances: ExportSettings) -> Table:
    """One column per exported pair, and the fp32 tolerance of each checked quantity."""
    first = reports[0]
    table = Table(
        title=f"ONNX vs PyTorch (images: {first.images}, objects: {first.objects})",
        title_justify="left",
    )
    table.add_column("quantity")
    for column in [report.precision for report in reports] + ["fp32 tolerance"]:
        table.add_column(column, justify="right")
    rows = (
        ("embedding max |diff|", "embedding_max_abs_diff", "embedding_atol"),
        ("mask logits max |diff|", "mask_logits_max_abs_diff", "mask_logits_atol"),
        ("IoU score max |diff|", "iou_predictions_max_abs_diff", None),
        ("box mIoU ONNX", "miou_onnx", None),
        ("box mIoU PyTorch", "miou_pytorch", None),
        ("box mIoU change", "miou_delta", "miou_atol"),
    )
    for label, field, tolerance in rows:
        values = [_fmt(getattr(report, field), field) for report in reports]
        limit = "-" if tolerance is None else f"{getattr(tolerances, tolerance):g}"
        table.add_row(label, *values, limit)
    return table


def _fmt(value: float | None, field: str) -> str:
    if value is None:
        return "-"
    if field == "miou_delta":
        return f"{value:+.4f}"
    return f"{value:.4f}" if field.startswith("miou") else f"{value:.2e}"
