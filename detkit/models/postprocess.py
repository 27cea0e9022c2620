"""SSD post-processing: decode offsets, clip, softmax without background, batched NMS."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from detkit.ops import clip_boxes, multiclass_nms
from detkit.structures import Detections, unpad_detections


def ssd_postprocess(*args, **kwargs) -> Detections:
    """:func:`ssd_postprocess_padded` turned into one dict per image (same arguments)."""
    return unpad_detections(*ssd_postprocess_padded(*args, **kwargs))


def ssd_postprocess_padded(
    cls_logits: Tensor,
    box_deltas: Tensor,
    priors: Tensor,
    box_coder: object,
    image_size: tuple[int, int],
    score_threshold: float = 0.01,
    nms_threshold: float = 0.45,
    detections_per_image: int = 200,
    topk_candidates: int = 400,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fixed-shape detections ``(boxes [B, K, 4], scores [B, K], labels [B, K], num [B])``
    (labels ``0..C-1``, pixels of ``image_size``, ``K = detections_per_image``), the layout
    ONNX/TensorRT deployments use.

    ``cls_logits [B, P, C + 1]`` with background at index 0, ``box_deltas [B, P, 4]``,
    ``priors [P, 4]`` xyxy pixels. Per class, at most ``topk_candidates`` boxes above
    ``score_threshold`` enter NMS; the best ``detections_per_image`` survive.
    """

    scores = F.softmax(cls_logits.float(), dim=-1)[..., 1:]
    boxes = box_coder.decode(box_deltas.float(), priors.float().unsqueeze(0))
    boxes = clip_boxes(boxes, image_size)
    return multiclass_nms(
        boxes,
        scores,
        score_threshold,
        nms_threshold,
        detections_per_image,
        per_class_top_k=topk_candidates,
    )
