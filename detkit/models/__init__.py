"""detkit detectors and their parts: SSD, YOLO (v1 and v3 styles) and Faster R-CNN, each a
composition of a backbone, optional neck, head, prior generator, box coder, matcher, sampler
and loss, built the same way (parts arrive ready-made) and inferring the same way
(``predict_padded``)."""

from detkit.models.detectors import SSD, YOLO, FasterRCNN, OneStageDetector

__all__ = ["SSD", "YOLO", "FasterRCNN", "OneStageDetector"]
