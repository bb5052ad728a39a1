"""ONNX export of SAM models (the image encoder and segment-anything's ONNX decoder) and a
parity check of the files against PyTorch. The files are run, here and by
`samkd eval --onnx`, by `samkd.evaluate.onnx_session.OnnxSam`.

onnx and onnxruntime (`pip install samkd[export]`) are imported only when used.
"""

from samkd.evaluate.onnx_session import (
    OnnxFiles,
    OnnxSam,
    measure_onnx_speed,
    require_export_extra,
)
from samkd.export.parity import ParityError, ParityReport, check_parity
from samkd.export.run import run_export

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
