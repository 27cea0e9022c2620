"""Detection evaluation: COCO and VOC mAP with the reference tools' exact numbers, fast."""

from detkit.eval.coco import evaluate_coco
from detkit.eval.voc import evaluate_voc

__all__ = ["evaluate_coco", "evaluate_voc"]
