"""Detection evaluation: COCO and VOC mAP with the reference tools' exact numbers, fast.

``evaluate_coco`` / ``evaluate_voc`` take COCO JSON (paths or objects); ``DetectionMetric``
is the torchmetrics object for training loops; ``detkit.eval.command.run`` is the
``detkit eval`` command; ``detkit.eval.report`` prints tables and writes plots.
"""

from typing import Any

from detkit.eval.coco import evaluate_coco
from detkit.eval.voc import evaluate_voc

__all__ = ["DetectionMetric", "evaluate_coco", "evaluate_voc"]


def __getattr__(name: str) -> Any:
    # torchmetrics is only imported by code that asks for the metric object.
    if name == "DetectionMetric":
        from detkit.eval.metric import DetectionMetric

        return DetectionMetric
    raise AttributeError(f"module 'detkit.eval' has no attribute {name!r}")
