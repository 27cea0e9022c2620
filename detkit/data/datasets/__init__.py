"""Dataset readers: COCO JSON, VOC devkit, Ultralytics YOLO and the built-in digits set."""

from detkit.data.datasets.base import DetectionDataset, ImageRecord
from detkit.data.datasets.coco import COCODetection
from detkit.data.datasets.digits import DigitsDetection, build_digits
from detkit.data.datasets.voc import VOC_CLASSES, VOCDetection
from detkit.data.datasets.yolo import YOLODetection

__all__ = [
    "COCODetection",
    "DetectionDataset",
    "DigitsDetection",
    "ImageRecord",
    "VOCDetection",
    "VOC_CLASSES",
    "YOLODetection",
    "build_digits",
]
