"""YOLO target assignment, batched over padded ground truth (no loop over images).

Collision rule (both versions): when several ground truths land in the same slot (v3: same
cell and same best anchor; v1: same cell) the later one in the image's target list wins, as
a loop writing targets into the grid would leave it. Objects in one cell whose best anchors
differ are all kept (v3). Padded ground truth and boxes of zero width or height are skipped.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from detkit.matching.fused import match_stats_dense
from detkit.matching.yolo_priors import YOLOGrid, YOLOPriors, YOLOv1Cells, wh_iou
from detkit.structures import PaddedTargets


class YOLOv3Assignment(NamedTuple):
    """Per-prior targets; priors in :class:`~detkit.matching.yolo_priors.YOLOPriors` order."""

    matched_gt: Tensor  # [B, P] int64: gt index (into M) of positives, 0 elsewhere
    pos_mask: Tensor  # [B, P] bool: responsible for a ground truth
    neg_mask: Tensor  # [B, P] bool: objectness target 0 (neither positive nor ignored)
    ignore_mask: Tensor  # [B, P] bool: not positive but overlaps a gt above the threshold


class YOLOv1Assignment(NamedTuple):
    """Per-cell targets of an S x S grid with ``K`` box predictors per cell."""

    matched_gt: Tensor  # [B, S, S] int64: gt index owning the cell, 0 where none
    obj_mask: Tensor  # [B, S, S] bool: cell holds the centre of a ground truth
    responsible: Tensor  # [B, S, S, K] bool: predictor responsible for the cell's gt
    pred_iou: Tensor  # [B, S, S, K] float32: IoU of each predictor with the cell's gt


def _usable(gt: PaddedTargets) -> tuple[Tensor, Tensor, Tensor]:
    boxes = gt.boxes.float()
    wh = boxes[..., 2:] - boxes[..., :2]
    centre = 0.5 * (boxes[..., :2] + boxes[..., 2:])
    return wh, centre, gt.mask & (wh > 0).all(dim=-1)


def _last_owner(slots: Tensor, valid: Tensor, num_slots: int) -> Tensor:
    """``[B, num_slots]`` highest gt index written to each slot, -1 where none."""
    batch, most = slots.shape
    gt_index = torch.arange(most, device=slots.device).expand(batch, most)
    owner = torch.full((batch, num_slots), -1, dtype=torch.int64, device=slots.device)
    return owner.scatter_reduce_(
        1, torch.where(valid, slots, 0), torch.where(valid, gt_index, -1), reduce="amax"
    )


def _best_iou_with_gt(pred_boxes: Tensor, gt: PaddedTargets) -> Tensor:
    """``[B, P]`` best IoU of each prediction with any real ground truth of its image."""
    from detkit.ops import box_iou

    gt_boxes, mask = gt.boxes.float(), gt.mask
    if pred_boxes.dim() == 2:
        return match_stats_dense(pred_boxes.float(), gt_boxes, mask).max_iou
    if pred_boxes.shape[1] == 0 or gt_boxes.shape[1] == 0:
        return pred_boxes.new_zeros(pred_boxes.shape[:2])
    iou = box_iou(pred_boxes.float(), gt_boxes).masked_fill(~mask[:, None, :], float("-inf"))
    return iou.max(dim=2).values.clamp(min=0)


def _yolov3_slots(
    gt: PaddedTargets, priors: YOLOPriors, image_size: Sequence[int]
) -> tuple[Tensor, Tensor, int]:
    """Flat prior index ``[B, M]`` of each gt's best anchor at its centre cell, validity, P."""
    device = gt.boxes.device
    fm_sizes = priors.feature_map_sizes(image_size)
    anchors_per_cell = priors.num_anchors_per_location()
    per_level = [gh * gw * n for (gh, gw), n in zip(fm_sizes, anchors_per_cell, strict=True)]
    num = sum(per_level)
    level_of = torch.tensor([s for s, sc in enumerate(priors.anchors) for _ in sc], device=device)
    index_in = torch.tensor([i for sc in priors.anchors for i in range(len(sc))], device=device)
    offsets = torch.tensor([0, *per_level[:-1]], device=device).cumsum(0)
    strides = torch.tensor(priors.strides, dtype=torch.float32, device=device)
    grid_w = torch.tensor([w for _, w in fm_sizes], device=device)
    grid_h = torch.tensor([h for h, _ in fm_sizes], device=device)
    counts = torch.tensor(anchors_per_cell, device=device)

    wh, centre, valid = _usable(gt)
    batch, most = gt.mask.shape
    anchors = priors.all_anchors().to(device)
    shape_iou = wh_iou(wh.reshape(-1, 2).clamp(min=1e-6), anchors).view(batch, most, -1)
    best = shape_iou.argmax(dim=-1)
    level, anchor = level_of[best], index_in[best]
    col = torch.minimum((centre[..., 0] / strides[level]).floor().long().clamp(min=0),
                        grid_w[level] - 1)  # fmt: skip
    row = torch.minimum((centre[..., 1] / strides[level]).floor().long().clamp(min=0),
                        grid_h[level] - 1)  # fmt: skip
    slots = offsets[level] + (row * grid_w[level] + col) * counts[level] + anchor
    return slots, valid, num


def assign_yolov3(
    gt: PaddedTargets,
    grid: YOLOGrid,
    pred_boxes: Tensor | None = None,
    ignore_threshold: float = 0.5,
) -> YOLOv3Assignment:
    """YOLOv3 assignment: each ground truth goes to its best-shaped anchor at its centre cell.

    Args:
        gt: padded ground truth, ``boxes [B, M, 4]`` xyxy pixels, ``mask [B, M]``.
        grid: the :class:`~detkit.matching.YOLOGrid` of the batch's image size (its priors
            give the scales, strides and anchors; P = sum over scales of ``h_s w_s A_s``).
        pred_boxes: decoded predictions ``[B, P, 4]`` xyxy pixels for the ignore rule; None
            uses the prior boxes ``[P, 4]`` (anchor-sized boxes at cell centres).
        ignore_threshold: a non-positive prediction whose IoU with some ground truth exceeds
            this is ignored (no objectness loss) instead of negative.
    """
    slots, valid, num = _yolov3_slots(gt, grid.priors, grid.image_size)
    owner = _last_owner(slots, valid, num)
    pos = owner >= 0

    if pred_boxes is None:
        pred_boxes = grid.boxes()
    if pred_boxes.shape[-2] != num:
        raise ValueError(f"pred_boxes has {pred_boxes.shape[-2]} boxes, the priors {num}")
    ignore = (_best_iou_with_gt(pred_boxes, gt) > ignore_threshold) & ~pos
    return YOLOv3Assignment(owner.clamp(min=0), pos, ~pos & ~ignore, ignore)


def assign_yolov1(
    gt: PaddedTargets,
    cells: YOLOv1Cells,
    pred_boxes: Tensor | None = None,
    num_predictors: int = 2,
) -> YOLOv1Assignment:
    """YOLOv1 assignment: the cell holding a ground truth's centre is responsible for it.

    Args:
        gt: padded ground truth, ``boxes [B, M, 4]`` xyxy pixels, ``mask [B, M]``.
        cells: the S x S :class:`~detkit.matching.YOLOv1Cells` of the batch's (h, w) image;
            cell (row, col) covers rows ``row H/S ...``.
        pred_boxes: decoded predictions ``[B, S, S, K, 4]`` xyxy pixels; of the K predictors
            of an object cell the one with the highest IoU with its gt is responsible (first
            on ties). None makes predictor 0 responsible and ``pred_iou`` zero.
        num_predictors: K when ``pred_boxes`` is None.
    """
    from detkit.ops import box_iou

    img_h, img_w = cells.image_size
    s = cells.grid_size
    wh, centre, valid = _usable(gt)
    col = (centre[..., 0] * s / img_w).floor().long().clamp(0, s - 1)
    row = (centre[..., 1] * s / img_h).floor().long().clamp(0, s - 1)
    owner = _last_owner(row * s + col, valid, s * s)
    batch = owner.shape[0]
    obj = owner >= 0
    matched = owner.clamp(min=0)
    if pred_boxes is not None and pred_boxes.dim() == 5:
        num_predictors = pred_boxes.shape[3]
    if pred_boxes is None or gt.boxes.shape[1] == 0:
        pred_iou = torch.zeros(batch, s * s, num_predictors, device=owner.device)
        responsible = torch.zeros_like(pred_iou, dtype=torch.bool)
        responsible[..., 0] = obj
    else:
        if pred_boxes.shape[:3] != (batch, s, s) or pred_boxes.shape[-1] != 4:
            raise ValueError(
                f"pred_boxes must be [B, S, S, K, 4] = [{batch}, {s}, {s}, K, 4], got "
                f"{tuple(pred_boxes.shape)}"
            )
        cell_gt = gt.boxes.float().gather(1, matched[..., None].expand(-1, -1, 4))
        preds = pred_boxes.reshape(batch, s * s, num_predictors, 4).float()
        pred_iou = box_iou(preds, cell_gt[:, :, None, :]).squeeze(-1)
        pred_iou = torch.where(obj[..., None], pred_iou.nan_to_num(0.0), 0.0)
        best = pred_iou.argmax(dim=-1, keepdim=True)
        responsible = torch.zeros_like(pred_iou, dtype=torch.bool).scatter_(2, best, True)
        responsible &= obj[..., None]
    return YOLOv1Assignment(
        matched.view(batch, s, s),
        obj.view(batch, s, s),
        responsible.view(batch, s, s, -1),
        pred_iou.view(batch, s, s, -1),
    )
