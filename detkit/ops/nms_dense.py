"""``multiclass_nms`` for few candidates: the whole selection on one dense IoU table.

A trained detector leaves a few dozen to a few hundred (box, class) pairs above the score
threshold per batch of one to a few images. For those, the general CPU engine
(:mod:`detkit.ops.nms_multiclass`: top-k rules, x-ordered windows, per-image plans) spends
its time in about 150 small tensor calls, not in arithmetic. Here every candidate pair gets
its IoU in one ``[M, M]`` table and the selection is about 60 calls: 0.68 -> 0.43 ms for
the digits YOLO's candidates of one image (2 cores). The table grows as ``M^2``, so past
:data:`DENSE_MAX` candidates the general engine is the faster one.

The same rule as every NMS path (:mod:`detkit.ops.nms`): torchvision's IoU arithmetic and
threshold, greedy order by score then box index per (image, class), the ``K`` best per image
by score, then class, then box.
"""

from __future__ import annotations

import torch
from torch import Tensor

from detkit.ops.nms_grouped import greedy_keep, group_order, iou_threshold_in, take

# Candidates up to which the dense table is the faster (measured on 2 cores, batches of 1 to
# 8 images, 10 classes: 0.39 against 0.65 ms for 3 candidates, 0.49 / 0.82 ms for 91, 0.86 /
# 1.07 ms for 389, 0.88 / 1.21 ms for 411; past that its float tables (0.64 MB at 400)
# outgrow the cache: 2.7 against 1.25 ms for 633).
DENSE_MAX = 400


def dense_select(
    boxes: Tensor,
    scores: Tensor,
    score_threshold: float,
    iou_threshold: float,
    max_detections: int,
    pre_nms_top_k: int | None,
    per_class_top_k: int | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
    """Padded detections as ``multiclass_nms`` returns them, or None when the candidates are
    too many for the dense table, or a top-k rule would cut them, or a candidate box is not
    finite (the general engine then runs torchvision's arithmetic as it is).

    ``boxes [B, N, 4]`` or ``[B, N, C, 4]`` and ``scores [B, N, C]`` in the compute type.
    """
    batch, n, num_classes = scores.shape
    # (image, class, box) order: inside each (image, class) group, the box order that breaks
    # score ties in the greedy visit, and across classes the order of the final ranking's ties.
    image, label, box = torch.nonzero(scores.transpose(1, 2) > score_threshold, as_tuple=True)
    count = image.numel()
    cut = any(k is not None and count > k for k in (pre_nms_top_k, per_class_top_k))
    if count > DENSE_MAX or cut:
        return None
    pair = (image * n + box) * num_classes + label
    cand_boxes = take(boxes.reshape(-1, 4), pair if boxes.dim() == 4 else pair // num_classes)
    if not bool(torch.isfinite(cand_boxes).all()):
        return None
    cand_scores = take(scores.reshape(-1), pair)
    # Greedy visit order: by group, then score (stable: ties keep box order).
    visit = group_order(cand_scores, image * num_classes + label)
    image, label = take(image, visit), take(label, visit)
    cand_boxes, cand_scores = take(cand_boxes, visit), take(cand_scores, visit)
    src, dst = _suppressions(cand_boxes, image * num_classes + label, iou_threshold)
    (kept,) = torch.nonzero(greedy_keep(count, src, dst), as_tuple=True)
    # Best first per image (stable: equal scores stay in (class, box) order), K per image.
    kept = take(kept, group_order(take(cand_scores, kept), take(image, kept)))
    image = take(image, kept)
    counts = torch.bincount(image, minlength=batch)
    rank = torch.arange(image.numel(), device=image.device) - take(
        torch.cumsum(counts, 0) - counts, image
    )
    (best,) = torch.nonzero(rank < max_detections, as_tuple=True)
    image, rank, kept = take(image, best), take(rank, best), take(kept, best)
    out_boxes = cand_boxes.new_zeros((batch, max_detections, 4))
    out_scores = cand_scores.new_zeros((batch, max_detections))
    out_labels = torch.zeros((batch, max_detections), dtype=torch.int64, device=image.device)
    out_boxes[image, rank] = take(cand_boxes, kept)
    out_scores[image, rank] = take(cand_scores, kept)
    out_labels[image, rank] = take(label, kept)
    return out_boxes, out_scores, out_labels, counts.clamp(max=max_detections)


def _suppressions(boxes: Tensor, groups: Tensor, iou_threshold: float) -> tuple[Tensor, Tensor]:
    """Edges ``(src, dst)``, ``src < dst``, of the boxes in visit order: same group and IoU
    above the threshold (torchvision's operations, whose result does not depend on which box
    of the pair is the kept one)."""
    x1, y1, x2, y2 = boxes.T.contiguous().unsqueeze(-1)  # rows contiguous: vectorised
    area = (x2 - x1) * (y2 - y1)
    width = torch.minimum(x2, x2.T).sub_(torch.maximum(x1, x1.T)).clamp_(min=0)
    height = torch.minimum(y2, y2.T).sub_(torch.maximum(y1, y1.T)).clamp_(min=0)
    inter = width.mul_(height)
    over = inter.div_((area + area.T).sub_(inter)) > iou_threshold_in(boxes.dtype, iou_threshold)
    over.triu_(1)
    over &= groups[:, None] == groups
    return torch.nonzero(over, as_tuple=True)
