"""torchvision detectors to detkit ones, in one place and one naming scheme:
``<family>_from_torchvision(cls, model)`` builds a detkit detector with the configuration and
weights of a torchvision one (what ``SSD.from_torchvision`` / ``FasterRCNN.from_torchvision``
call), ``load_<family>_torchvision_weights(detector, name)`` copies downloaded weights into a
detector built from a config (``pretrained=torchvision``).

The converters receive the detector class and never import the detector modules, so the
detectors can call them without an import cycle.
"""

from detkit.models.convert.faster_rcnn import faster_rcnn_from_torchvision
from detkit.models.convert.ssd import (
    coco_classifier_rows,
    load_ssd_torchvision_weights,
    ssd_from_torchvision,
)

__all__ = [
    "coco_classifier_rows",
    "faster_rcnn_from_torchvision",
    "load_ssd_torchvision_weights",
    "ssd_from_torchvision",
]
