"""Box operations as ``torch.library`` custom ops in the ``detkit`` namespace.

Each op has a CPU path (torchvision's compiled kernels where torchvision has the op), a CUDA
path written as Triton kernels (:mod:`detkit.ops.kernels`), a fake implementation for
``torch.compile``/``torch.export``, autograd where it has gradients, and an ONNX translation.
"""

from detkit.ops.boxes import (
    box_area,
    box_convert,
    box_iou,
    ciou_loss,
    clip_boxes,
    complete_box_iou,
    diou_loss,
    distance_box_iou,
    generalized_box_iou,
    giou_loss,
    large_enough,
    remove_small_boxes,
)
from detkit.ops.nms import batched_nms, multiclass_nms, nms, soft_nms
from detkit.ops.roi import roi_align, roi_pool

__all__ = [
    "batched_nms",
    "box_area",
    "box_convert",
    "box_iou",
    "ciou_loss",
    "clip_boxes",
    "complete_box_iou",
    "diou_loss",
    "distance_box_iou",
    "generalized_box_iou",
    "giou_loss",
    "large_enough",
    "multiclass_nms",
    "nms",
    "remove_small_boxes",
    "roi_align",
    "roi_pool",
    "soft_nms",
]
