"""Deployment: ONNX export of every detector family and an ONNX Runtime detector.

- :func:`export_onnx` (``model -> model.onnx + model.json``, checked in ONNX Runtime),
- :class:`OnnxDetector` / :func:`load_onnx_detector` (what ``detkit predict|eval
  ckpt=model.onnx`` run),
- :func:`export_wrapper` (the traceable ``images -> tensors`` module of a detector: its own
  ``predict_padded``).

``detkit export`` (a checkpoint to ONNX) is :func:`detkit.engine.export.export_checkpoint`.
"""

from detkit.eval.compare import Comparison, compare_detections
from detkit.export.onnx import ExportResult, export_onnx
from detkit.export.onnx_runtime import OnnxDetector, load_onnx_detector
from detkit.export.verify import ExportCheckError
from detkit.export.wrappers import export_wrapper

__all__ = [
    "Comparison",
    "ExportCheckError",
    "ExportResult",
    "OnnxDetector",
    "compare_detections",
    "export_onnx",
    "export_wrapper",
    "load_onnx_detector",
]
