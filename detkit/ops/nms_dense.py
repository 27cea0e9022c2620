"""``multiclass_nms`` for few candidates: the whole selection on one dense IoU table.

A trained detector leaves a few dozen to a few hundred (box, class) pairs above the score
threshold per image. For those, the general CPU engine (:mod:`detkit.ops.nms_multiclass`:
top-k rules, x-ordered windows, per-image plans) spends its time in about 150 small tensor
calls, not in arithmetic. Here every pair of candidates of one image gets its IoU in one
``[B, m, m]`` table (``m`` the most candidates of an image) and the selection is about 60
calls: 0.72 -> 0.34 ms for the trained digits YOLO's 108 candidates of one image, 0.93 ->
0.55 ms for 292 of four, 1.46 -> 1.1 ms for 584 of eight (2 cores). The table grows as
``B m^2``: past :data:`DENSE_ELEMENTS` the general engine is the faster.

The same rule as every NMS path (:mod:`detkit.ops.nms`): torchvision's IoU arithmetic and
threshold, greedy order by score then box index per (image, class), the ``K`` best per image
by score, then class, then box.
"""

from __future__ import annotations

import torch
from torch import Tensor

from detkit.ops.boxes import pairwise_iou
from detkit.ops.nms_grouped import greedy_keep, iou_threshold_in, take

# The table's size limit: batch x m x m <= DENSE_ELEMENTS, m the most candidates of an image
# (1 MiB of float32). Measured on 2 cores, 10 classes, against the general engine: one image,
# 0.27 / 0.64 ms for 3 candidates, 0.42 / 1.02 ms for 139, 0.87 / 1.19 ms for 505, then the
# tables outgrow the cache: 3.4 / 1.33 ms for 772; eight images, 1.21 / 1.50 ms at m = 139
# (155k elements), 1.11 / 1.53 ms at 167 (223k), 2.71 / 1.58 ms at 207 (343k).
DENSE_ELEMENTS = 1 << 18


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
    # (image, class, box) order: the order of equal scores, in NMS (box) and in the ranking.
    image, label, box = torch.nonzero(scores.transpose(1, 2) > score_threshold, as_tuple=True)
    count = image.numel()
    per_image = torch.bincount(image, minlength=batch)
    most = int(per_image.max()) if count else 0
    cut = any(k is not None and most > k for k in (pre_nms_top_k, per_class_top_k))
    if batch * most * most > DENSE_ELEMENTS or cut:
        return None
    out_boxes = boxes.new_zeros((batch, max_detections, 4))
    out_scores = scores.new_zeros((batch, max_detections))
    out_labels = torch.zeros((batch, max_detections), dtype=torch.int64, device=scores.device)
    if count == 0:
        counts = torch.zeros(batch, dtype=torch.int64, device=scores.device)
        return out_boxes, out_scores, out_labels, counts
    pair = (image * n + box) * num_classes + label
    cand_boxes = take(boxes.reshape(-1, 4), pair if boxes.dim() == 4 else pair // num_classes)
    if not bool(torch.isfinite(cand_boxes).all()):
        return None
    cand_scores = take(scores.reshape(-1), pair)
    # One stable sort by score: inside a group it is the greedy visit order, and across the
    # classes of an image the ranking's, equal scores in (class, box) order both times.
    by_score = torch.sort(cand_scores, descending=True, stable=True).indices
    visit_rank = torch.empty_like(by_score).index_copy_(
        0, by_score, torch.arange(count, device=by_score.device)
    )
    src, dst = _suppressions(cand_boxes, label, visit_rank, image, per_image, most, iou_threshold)
    keep = greedy_keep(count, src, dst)
    ranked = take(by_score, torch.nonzero(take(keep, by_score), as_tuple=True)[0])
    if batch > 1:
        ranked = take(ranked, torch.sort(take(image, ranked), stable=True).indices)
    image = take(image, ranked)
    counts = torch.bincount(image, minlength=batch)
    rank = torch.arange(image.numel(), device=image.device) - take(
        torch.cumsum(counts, 0) - counts, image
    )
    (best,) = torch.nonzero(rank < max_detections, as_tuple=True)
    image, rank, ranked = take(image, best), take(rank, best), take(ranked, best)
    out_boxes[image, rank] = take(cand_boxes, ranked)
    out_scores[image, rank] = take(cand_scores, ranked)
    out_labels[image, rank] = take(label, ranked)
    return out_boxes, out_scores, out_labels, counts.clamp(max=max_detections)


def _suppressions(
    boxes: Tensor,
    labels: Tensor,
    visit_rank: Tensor,
    image: Tensor,
    per_image: Tensor,
    most: int,
    iou_threshold: float,
) -> tuple[Tensor, Tensor]:
    """Edges ``(src, dst)`` between candidates (image-major): same image and class, IoU above
    the threshold, ``src`` visited first. One ``[B, m, m]`` table, ``m`` the most candidates
    of an image, rows padded with empty boxes (IoU 0 or NaN: never above a threshold in
    [0, 1]). ``pairwise_iou`` has torchvision's operations, whose result does not depend on
    which box of the pair is the kept one (``max``, ``min`` and the sum of the areas are
    symmetric)."""
    batch = per_image.numel()
    start = None
    if batch == 1:  # the candidates are the table's rows
        boxes, labels, visit_rank = boxes[None], labels[None], visit_rank[None]
    else:
        start = torch.cumsum(per_image, 0) - per_image
        slot = torch.arange(image.numel(), device=image.device) - take(start, image)
        rows = (image, slot)
        boxes = boxes.new_zeros((batch, most, 4)).index_put_(rows, boxes)
        labels = labels.new_zeros((batch, most)).index_put_(rows, labels)
        visit_rank = visit_rank.new_zeros((batch, most)).index_put_(rows, visit_rank)
    over = pairwise_iou(boxes, boxes) > iou_threshold_in(boxes.dtype, iou_threshold)
    over &= visit_rank[:, :, None] < visit_rank[:, None, :]
    over &= labels[:, :, None] == labels[:, None, :]
    table, src, dst = torch.nonzero(over, as_tuple=True)
    if start is None:
        return src, dst
    offset = take(start, table)
    return offset + src, offset + dst
