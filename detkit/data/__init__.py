"""Datasets, augmentation pipelines and loaders (see :mod:`detkit.structures` for the
conventions every item follows)."""

from detkit.data.boxes import boxes_to_original
from detkit.data.collate import collate
from detkit.data.datamodule import DetectionDataModule
from detkit.data.datasets import (
    VOC_CLASSES,
    COCODetection,
    DetectionDataset,
    DigitsDetection,
    VOCDetection,
    YOLODetection,
    build_digits,
)

__all__ = [
    "COCODetection",
    "DetectionDataModule",
    "DetectionDataset",
    "DigitsDetection",
    "VOCDetection",
    "VOC_CLASSES",
    "YOLODetection",
    "boxes_to_original",
    "build_digits",
    "collate",
]
