"""Detection heads: predictors over feature maps, and how their outputs become scores."""

from detkit.models.heads.roi_heads import FastRCNNPredictor, RoIHeads, RoIPooler, TwoMLPHead
from detkit.models.heads.rpn import RegionProposalNetwork, RPNHead
from detkit.models.heads.ssd import SSDHead, SSDOutput
from detkit.models.heads.yolo import (
    YOLOv1Head,
    YOLOv1Output,
    YOLOv3Head,
    YOLOv3Output,
    YOLOv8Head,
    YOLOv8Output,
)

__all__ = [
    "FastRCNNPredictor",
    "RPNHead",
    "RegionProposalNetwork",
    "RoIHeads",
    "RoIPooler",
    "SSDHead",
    "SSDOutput",
    "TwoMLPHead",
    "YOLOv1Head",
    "YOLOv1Output",
    "YOLOv3Head",
    "YOLOv3Output",
    "YOLOv8Head",
    "YOLOv8Output",
]
