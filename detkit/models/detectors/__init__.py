"""Detectors: compositions of backbone, neck, head, prior generator, box coder and loss."""

from detkit.models.detectors.faster_rcnn import FasterRCNN
from detkit.models.detectors.one_stage import OneStageDetector
from detkit.models.detectors.ssd import SSD
from detkit.models.detectors.yolo import YOLO

__all__ = ["SSD", "YOLO", "FasterRCNN", "OneStageDetector"]
