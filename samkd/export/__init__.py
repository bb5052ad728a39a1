"""ONNX export of SAM models (the image encoder and segment-anything's ONNX decoder), a
parity check of the files against PyTorch, and running them for `samkd eval --onnx`.

onnx and onnxruntime (`pip install samkd[export]`) are imported only when used.
"""

from samkd.export.onnx import OnnxFiles, require_export_extra
from samkd.export.parity import ParityError, ParityReport, check_parity
from samkd.export.run import run_export
from samkd.export.session import OnnxSam, measure_onnx_speed

__all__ = [
    "OnnxFiles",
    "OnnxSam",
    "ParityError",
    "ParityReport",
    "check_parity",
    "measure_onnx_speed",
    "require_export_extra",
    "run_export",
]
