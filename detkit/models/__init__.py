"""detkit detectors and their parts: SSD, YOLO (v1 and v3 styles) and Faster R-CNN, each a
composition of a backbone, optional neck, head, prior generator, matcher, sampler and coder."""

from detkit.models.detectors.faster_rcnn import FasterRCNN
from detkit.models.detectors.ssd import SSD
from detkit.models.detectors.yolo import YOLO

__all__ = ["SSD", "YOLO", "FasterRCNN"]
