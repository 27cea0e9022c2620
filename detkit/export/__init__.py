"""Deployment: ONNX export of every detector family and an ONNX Runtime detector.

- :func:`export_onnx` (``model -> model.onnx + model.json``, checked in ONNX Runtime),
- :func:`export_checkpoint` (what ``detkit export`` runs),
- :class:`OnnxDetector` / :func:`load_onnx_detector` (what ``detkit predict|eval ckpt=model.onnx``
  run),
- :func:`export_wrapper` (the traceable ``images -> tensors`` module of a detector).
"""

from detkit.export.command import export_checkpoint
from detkit.export.onnx import ExportResult, export_onnx
from detkit.export.onnx_runtime import OnnxDetector, load_onnx_detector
from detkit.export.verify import Comparison, ExportCheckError, compare_detections
from detkit.export.wrappers import export_wrapper

__all__ = [
    "Comparison",
    "ExportCheckError",
    "ExportResult",
    "OnnxDetector",
    "compare_detections",
    "export_checkpoint",
    "export_onnx",
    "export_wrapper",
    "load_onnx_detector",
]
