"""Task-aligned assignment (TOOD, Feng et al. 2021; YOLOv8), batched over padded ground truth.

For each ground truth ``g`` and each anchor point ``p``:

1. centre prior: ``p`` is a candidate of ``g`` when it lies strictly inside ``g``'s box;
2. alignment ``t = s^alpha * u^beta``, where ``s`` is the predicted score of ``g``'s class at
   ``p`` and ``u`` the IoU of the box predicted at ``p`` with ``g`` (0 for non-candidates);
3. ``g`` takes its ``topk`` candidates of highest alignment as positives (all of them when
   it has fewer);
4. a point chosen by several ground truths keeps the one its predicted box overlaps most
   (the lowest index on a tie);
5. soft classification target of a positive ``p`` of ``g``: ``g``'s class with value
   ``t(p) / max t * max u``, both maxima over ``g``'s positives (after step 4), so every
   object's best-aligned point aims at its best IoU, and the others proportionally lower.

Nothing loops over images or objects: every step is one tensor operation on ``[B, M, P]``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from detkit.structures import PaddedTargets


class TaskAlignedAssignment(NamedTuple):
    """Per-point targets of a batch; points in the prior generator's flattened order."""

    matched_gt: Tensor  # [B, P] int64: index (into M) of the assigned gt, 0 for negatives
    pos_mask: Tensor  # [B, P] bool: assigned to a ground truth
    target_scores: Tensor  # [B, P, C] float32: soft class targets (0 rows for negatives)


class TaskAlignedAssigner:
    """Callable form of :func:`assign_task_aligned` holding its settings (for configs).

    Args:
        topk: positives per ground truth (10 in TOOD and YOLOv8).
        alpha: exponent of the classification score in the alignment (0.5).
        beta: exponent of the IoU in the alignment (6.0).
    """

    def __init__(self, topk: int = 10, alpha: float = 0.5, beta: float = 6.0) -> None:
        if int(topk) < 1:
            raise ValueError(f"TaskAlignedAssigner: topk must be >= 1, got {topk}")
        if float(alpha) < 0 or float(beta) < 0:
            raise ValueError(f"TaskAlignedAssigner: alpha ({alpha}) and beta ({beta}) must be >= 0")
        self.topk, self.alpha, self.beta = int(topk), float(alpha), float(beta)

    def __call__(
        self, pred_scores: Tensor, pred_boxes: Tensor, points: Tensor, gt: PaddedTargets
    ) -> TaskAlignedAssignment:
        return assign_task_aligned(
            pred_scores, pred_boxes, points, gt, self.topk, self.alpha, self.beta
        )

    def __repr__(self) -> str:
        return f"TaskAlignedAssigner(topk={self.topk}, alpha={self.alpha}, beta={self.beta})"


def points_inside(points: Tensor, boxes: Tensor, eps: float = 1e-9) -> Tensor:
    """``[B, M, P]``: point ``p`` (``points [P, 2]``) lies strictly inside box ``m``
    (``boxes [B, M, 4]`` xyxy), by more than ``eps`` from every side."""
    x, y = points[:, 0], points[:, 1]
    b = boxes[..., None]  # [B, M, 4, 1] against [P]
    margin = torch.minimum(
        torch.minimum(x - b[:, :, 0], y - b[:, :, 1]),
        torch.minimum(b[:, :, 2] - x, b[:, :, 3] - y),
    )
    return margin > eps


def assign_task_aligned(
    pred_scores: Tensor,
    pred_boxes: Tensor,
    points: Tensor,
    gt: PaddedTargets,
    topk: int = 10,
    alpha: float = 0.5,
    beta: float = 6.0,
    eps: float = 1e-9,
) -> TaskAlignedAssignment:
    """Task-aligned assignment of a batch (the steps in the module docstring).

    Args:
        pred_scores: ``[B, P, C]`` predicted class probabilities (after the sigmoid; detach
            them: assignment is not differentiated).
        pred_boxes: ``[B, P, 4]`` decoded predicted boxes, xyxy pixels.
        points: ``[P, 2]`` anchor points (x, y) pixels.
        gt: padded ground truth, ``boxes [B, M, 4]`` xyxy pixels, ``labels [B, M]`` in
            ``0..C-1``, ``mask [B, M]``; boxes without width or height are skipped.
        topk, alpha, beta: see the module docstring.
    """
    batch, num_points, num_classes = pred_scores.shape
    if pred_boxes.shape != (batch, num_points, 4) or points.shape != (num_points, 2):
        raise ValueError(
            f"assign_task_aligned: pred_scores {tuple(pred_scores.shape)}, pred_boxes "
            f"{tuple(pred_boxes.shape)} and points {tuple(points.shape)} disagree "
            "(expected [B, P, C], [B, P, 4], [P, 2])"
        )
    from detkit.ops import box_iou

    boxes = gt.boxes.float()
    most = boxes.shape[1]
    if most == 0:  # no ground truth in the whole batch: every point is negative
        none = torch.zeros(batch, num_points, dtype=torch.int64, device=pred_scores.device)
        return TaskAlignedAssignment(none, none.bool(), torch.zeros_like(pred_scores).float())
    usable = gt.mask & (boxes[..., 2:] > boxes[..., :2]).all(dim=-1)
    candidate = points_inside(points.float(), boxes, eps) & usable[..., None]  # [B, M, P]
    iou = box_iou(boxes, pred_boxes.float()).nan_to_num(0.0).clamp(min=0.0)
    iou = torch.where(candidate, iou, 0.0)
    labels = gt.labels.clamp(min=0)
    score = pred_scores.float().gather(2, labels[:, None, :].expand(-1, num_points, -1))
    align = torch.where(candidate, score.transpose(1, 2).pow(alpha) * iou.pow(beta), 0.0)

    # Top-k candidates of each object; non-candidates rank below every candidate.
    ranked = torch.where(candidate, align, -1.0)
    chosen = ranked.topk(min(topk, num_points), dim=-1).indices
    positive = torch.zeros_like(candidate).scatter_(-1, chosen, True) & candidate

    # One object per point: the chosen one its box overlaps most (argmax: lowest index).
    owner = torch.where(positive, iou, -1.0).argmax(dim=1)  # [B, P]
    assigned = positive.any(dim=1)
    gt_index = torch.arange(most, device=owner.device)[None, :, None]
    positive &= gt_index == owner[:, None, :]

    align = torch.where(positive, align, 0.0)
    best_align = align.amax(dim=-1, keepdim=True)  # [B, M, 1]
    best_iou = torch.where(positive, iou, 0.0).amax(dim=-1, keepdim=True)
    strength = (align * best_iou / (best_align + eps)).amax(dim=1)  # [B, P]
    matched = torch.where(assigned, owner, 0)
    label = labels.gather(1, matched)
    one_hot = F.one_hot(label, num_classes).to(strength.dtype)
    target_scores = one_hot * (strength * assigned)[..., None]
    return TaskAlignedAssignment(matched, assigned, target_scores)
