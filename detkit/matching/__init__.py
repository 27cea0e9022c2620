"""Priors, box coders, matchers and samplers: ground truth to training targets.

Everything works on whole batches (padded ground truth with a mask, see
:func:`detkit.structures.pad_targets`); nothing loops over images.
"""

from detkit.matching.anchor_points import AnchorPointGrid, AnchorPoints
from detkit.matching.anchors import AnchorGenerator, DefaultBoxGenerator
from detkit.matching.box_coders import DeltaXYWHCoder, DistanceCoder, YOLOv1Coder, YOLOv3Coder
from detkit.matching.fused import (
    MatchStats,
    match_stats_chunked,
    match_stats_dense,
    stats_from_iou,
)
from detkit.matching.matcher import Matcher, MatchResult, SSDMatcher, match_priors
from detkit.matching.samplers import BalancedPositiveNegativeSampler, HardNegativeSampler
from detkit.matching.task_aligned import (
    TaskAlignedAssigner,
    TaskAlignedAssignment,
    assign_task_aligned,
)
from detkit.matching.yolo_assign import (
    YOLOv1Assignment,
    YOLOv3Assignment,
    assign_yolov1,
    assign_yolov3,
)
from detkit.matching.yolo_priors import (
    YOLOGrid,
    YOLOPriors,
    YOLOv1Cells,
    YOLOv1Grid,
    fit_anchors,
    fit_anchors_from_dataset,
    wh_iou,
)

__all__ = [
    "AnchorGenerator",
    "AnchorPointGrid",
    "AnchorPoints",
    "BalancedPositiveNegativeSampler",
    "DefaultBoxGenerator",
    "DeltaXYWHCoder",
    "DistanceCoder",
    "HardNegativeSampler",
    "MatchResult",
    "MatchStats",
    "Matcher",
    "SSDMatcher",
    "TaskAlignedAssigner",
    "TaskAlignedAssignment",
    "YOLOGrid",
    "YOLOPriors",
    "YOLOv1Cells",
    "YOLOv1Grid",
    "YOLOv1Assignment",
    "YOLOv1Coder",
    "YOLOv3Assignment",
    "YOLOv3Coder",
    "assign_task_aligned",
    "assign_yolov1",
    "assign_yolov3",
    "fit_anchors",
    "fit_anchors_from_dataset",
    "match_priors",
    "match_stats_chunked",
    "match_stats_dense",
    "stats_from_iou",
    "wh_iou",
]
