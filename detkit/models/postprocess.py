"""SSD post-processing: decode offsets, clip, softmax without background, batched NMS."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from detkit.structures import Detections, unpad_detections


def ssd_postprocess(
    cls_logits: Tensor,
    box_deltas: Tensor,
    priors: Tensor,
    box_coder: object,
    image_size: tuple[int, int],
    score_threshold: float = 0.01,
    nms_threshold: float = 0.45,
    detections_per_image: int = 200,
    topk_candidates: int = 400,
) -> Detections:
    """Detections (one dict per image, labels ``0..C-1``) in the pixels of ``image_size``.

    ``cls_logits [B, P, C + 1]`` with background at index 0, ``box_deltas [B, P, 4]``,
    ``priors [P, 4]`` xyxy pixels. Per class, at most ``topk_candidates`` boxes above
    ``score_threshold`` enter NMS; the best ``detections_per_image`` survive.
    """
    from detkit.ops import clip_boxes, multiclass_nms

    scores = F.softmax(cls_logits.float(), dim=-1)[..., 1:]
    boxes = box_coder.decode(box_deltas.float(), priors.float().unsqueeze(0))
    boxes = clip_boxes(boxes, image_size)
    out = multiclass_nms(
        boxes,
        scores,
        score_threshold,
        nms_threshold,
        detections_per_image,
        per_class_top_k=topk_candidates,
    )
    return unpad_detections(*out)
