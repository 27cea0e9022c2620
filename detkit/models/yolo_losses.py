"""YOLO losses, batched over padded ground truth (no loop over images).

All are called as ``loss(outputs, reference, box_coder, gt)``: the head's outputs, the
reference of the detector's prior generator (:class:`~detkit.matching.YOLOv1Cells` /
:class:`~detkit.matching.YOLOGrid` / :class:`~detkit.matching.AnchorPointGrid`), the
detector's box coder and the padded ground truth. Assignment comes from
:mod:`detkit.matching` (``assign_yolov1`` / ``assign_yolov3`` / ``TaskAlignedAssigner``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detkit.matching import assign_yolov1, assign_yolov3
from detkit.ops import ciou_loss, giou_loss
from detkit.structures import PaddedTargets, with_padding_slot

BOX_LOSSES = ("offsets", "giou", "ciou")


def _gather(values: Tensor, index: Tensor) -> Tensor:
    """``values [B, M, ...]`` picked by ``index [B, ...]`` along M."""
    flat = index.reshape(index.shape[0], -1)
    extra = values.shape[2:]
    picked = values.gather(
        1, flat.view(*flat.shape, *([1] * len(extra))).expand(*flat.shape, *extra)
    )
    return picked.view(*index.shape, *extra)


class YOLOv1Loss(nn.Module):
    """The YOLOv1 sum-squared loss (Redmon et al. 2016, eq. 3), divided by the batch size.

    ``box_regression``: ``lambda_coord`` x squared error of (x, y, sqrt w, sqrt h) of responsible
    predictors; ``objectness``: squared error of their confidence against the (detached) IoU of
    the prediction with its ground truth, plus ``lambda_noobj`` x squared confidence of every
    other predictor; ``classification``: squared error of the class probabilities of cells
    holding an object centre. The responsible predictor is the one with the highest IoU in the
    cell holding the centre (:func:`detkit.matching.assign_yolov1`).
    """

    def __init__(self, lambda_coord: float = 5.0, lambda_noobj: float = 0.5) -> None:
        super().__init__()
        self.lambda_coord = float(lambda_coord)
        self.lambda_noobj = float(lambda_noobj)

    def forward(self, outputs, cells, box_coder, gt: PaddedTargets) -> dict[str, Tensor]:
        gt = with_padding_slot(gt)
        pred_boxes = box_coder.decode(cells, outputs.box).detach()
        assign = assign_yolov1(gt, cells, pred_boxes)
        cell_boxes = _gather(gt.boxes.float(), assign.matched_gt)  # [B, S, S, 4]
        cell_labels = _gather(gt.labels.clamp(min=0), assign.matched_gt)  # [B, S, S]
        target = box_coder.encode(cells, cell_boxes[..., None, :])  # [B, S, S, 1, 4]

        resp = assign.responsible.to(outputs.box.dtype)  # [B, S, S, K]
        coord_err = (outputs.box - target).square().sum(-1)
        conf_obj = (outputs.confidence - assign.pred_iou.to(outputs.confidence.dtype)).square()
        conf_noobj = outputs.confidence.square()
        num_classes = outputs.class_prob.shape[-1]
        one_hot = F.one_hot(cell_labels, num_classes).to(outputs.class_prob.dtype)
        class_err = (outputs.class_prob - one_hot).square().sum(-1)

        batch = outputs.box.shape[0]
        return {
            "box_regression": self.lambda_coord * (coord_err * resp).sum() / batch,
            "objectness": (
                (conf_obj * resp).sum() + self.lambda_noobj * (conf_noobj * (1 - resp)).sum()
            )
            / batch,
            "classification": (class_err * assign.obj_mask.to(class_err.dtype)).sum() / batch,
        }


class YOLOv3Loss(nn.Module):
    """YOLOv3 loss: BCE objectness and per-class BCE, plus a selectable box loss.

    Each ground truth is assigned to its best-shaped anchor at its centre cell; predictions
    that are not positive but overlap a ground truth above ``ignore_threshold`` get no
    objectness loss (:func:`detkit.matching.assign_yolov3`). Every term is summed and divided
    by the number of positives of the batch.

    Args:
        box_loss: ``"offsets"`` (the v3 coder's targets: BCE on sigmoid(t_x), sigmoid(t_y) and
            MSE on t_w, t_h, weighted by ``2 - w h / (W H)`` as darknet does) or ``"giou"`` /
            ``"ciou"`` on the decoded boxes (:func:`detkit.ops.giou_loss`/``ciou_loss``).
        ignore_threshold: IoU above which a non-positive prediction is not a negative.
        box_weight, objectness_weight, classification_weight: term weights.
        noobj_weight: extra weight on the objectness loss of negatives.
    """

    def __init__(
        self,
        box_loss: str = "ciou",
        ignore_threshold: float = 0.5,
        box_weight: float = 1.0,
        objectness_weight: float = 1.0,
        classification_weight: float = 1.0,
        noobj_weight: float = 1.0,
    ) -> None:
        super().__init__()
        if box_loss not in BOX_LOSSES:
            raise ValueError(f"YOLOv3Loss: box_loss={box_loss!r} is not one of {BOX_LOSSES}")
        if not 0.0 < ignore_threshold <= 1.0:
            raise ValueError(
                f"YOLOv3Loss: ignore_threshold must be in (0, 1], got {ignore_threshold}"
            )
        self.box_loss = box_loss
        self.ignore_threshold = float(ignore_threshold)
        self.box_weight = float(box_weight)
        self.objectness_weight = float(objectness_weight)
        self.classification_weight = float(classification_weight)
        self.noobj_weight = float(noobj_weight)

    def forward(self, outputs, grid, box_coder, gt: PaddedTargets) -> dict[str, Tensor]:
        gt = with_padding_slot(gt)
        box_raw = outputs.box.float()
        objectness = outputs.objectness.float()
        pred_boxes = box_coder.decode(grid, box_raw)
        assign = assign_yolov3(gt, grid, pred_boxes.detach(), self.ignore_threshold)
        pos = assign.pos_mask
        num_pos = pos.sum().clamp(min=1).to(box_raw.dtype)

        obj_target = pos.to(box_raw.dtype)
        obj_weight = pos.to(box_raw.dtype) + self.noobj_weight * assign.neg_mask.to(box_raw.dtype)
        obj_loss = F.binary_cross_entropy_with_logits(
            objectness, obj_target, weight=obj_weight, reduction="sum"
        )

        batch_idx, prior_idx = pos.nonzero(as_tuple=True)
        gt_idx = assign.matched_gt[batch_idx, prior_idx]
        gt_boxes = gt.boxes[batch_idx, gt_idx].float()
        num_classes = outputs.class_logits.shape[-1]
        one_hot = F.one_hot(gt.labels[batch_idx, gt_idx], num_classes).to(box_raw.dtype)
        pos_logits = outputs.class_logits[batch_idx, prior_idx].float()
        cls_loss = F.binary_cross_entropy_with_logits(pos_logits, one_hot, reduction="sum")
        if self.box_loss == "offsets":
            target = box_coder.encode(grid.rows(prior_idx), gt_boxes)
            box_loss = self._offsets_loss(box_raw[batch_idx, prior_idx], target, gt_boxes, grid)
        else:
            fn = giou_loss if self.box_loss == "giou" else ciou_loss
            box_loss = fn(pred_boxes[batch_idx, prior_idx], gt_boxes, reduction="sum")
        return {
            "box_regression": self.box_weight * box_loss / num_pos,
            "objectness": self.objectness_weight * obj_loss / num_pos,
            "classification": self.classification_weight * cls_loss / num_pos,
        }

    @staticmethod
    def _offsets_loss(pos_raw: Tensor, target: Tensor, gt_boxes: Tensor, grid) -> Tensor:
        # Small boxes get up to twice the weight: an offset error costs them more IoU.
        area = (gt_boxes[:, 2] - gt_boxes[:, 0]) * (gt_boxes[:, 3] - gt_boxes[:, 1])
        scale = 2.0 - area / float(grid.image_size[0] * grid.image_size[1])
        xy = F.binary_cross_entropy_with_logits(
            pos_raw[:, :2], target[:, :2].clamp(0, 1), reduction="none"
        ).sum(-1)
        wh = (pos_raw[:, 2:4] - target[:, 2:]).square().sum(-1)
        return (scale * (xy + wh)).sum()


def distribution_focal_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Distribution focal loss (Li et al. 2020) ``[...]`` of ``logits [..., R]`` over the bins
    ``0..R-1`` for continuous targets ``[...]`` in ``[0, R - 1)``: cross-entropy towards the two
    bins around the target, weighted by its distance to the other one, so the distribution's
    expectation is pulled onto the target."""
    left = target.long()
    right_weight = target - left
    log_prob = logits.log_softmax(dim=-1)
    picked = log_prob.gather(-1, torch.stack((left, left + 1), dim=-1))
    return -(picked[..., 0] * (1 - right_weight) + picked[..., 1] * right_weight)


class YOLOv8Loss(nn.Module):
    """The anchor-free YOLO loss (YOLOv8): task-aligned assignment, BCE classification
    against the normalised alignment as soft target, CIoU and distribution focal loss on the
    positives, each positive weighted by its soft target.

    ``loss(outputs, grid, box_coder, gt)``: the :class:`~detkit.models.heads.yolo.YOLOv8Output`,
    the :class:`~detkit.matching.AnchorPointGrid`, the :class:`~detkit.matching.DistanceCoder`
    and the padded ground truth. Every term is summed and divided by the sum of the soft
    targets (at least 1), as YOLOv8 does; the terms are logged as ``classification``,
    ``box_regression`` (CIoU) and ``distribution_focal``.

    Args:
        assigner: ``(scores [B, P, C], boxes [B, P, 4], points [P, 2], gt) ->``
            :class:`~detkit.matching.TaskAlignedAssignment` (e.g.
            :class:`~detkit.matching.TaskAlignedAssigner`, the default).
        box_weight, classification_weight, dfl_weight: term weights (YOLOv8: 7.5, 0.5, 1.5).
    """

    def __init__(
        self,
        assigner: object | None = None,
        box_weight: float = 7.5,
        classification_weight: float = 0.5,
        dfl_weight: float = 1.5,
    ) -> None:
        super().__init__()
        if assigner is None:
            from detkit.matching import TaskAlignedAssigner

            assigner = TaskAlignedAssigner()
        self.assigner = assigner
        self.box_weight = float(box_weight)
        self.classification_weight = float(classification_weight)
        self.dfl_weight = float(dfl_weight)

    def forward(self, outputs, grid, box_coder, gt: PaddedTargets) -> dict[str, Tensor]:
        gt = with_padding_slot(gt)
        logits = outputs.class_logits.float()
        box_logits = outputs.box.float()
        pred_boxes = box_coder.decode(grid, box_logits)
        assign = self.assigner(logits.detach().sigmoid(), pred_boxes.detach(), grid.points, gt)
        target_scores = assign.target_scores.to(logits.dtype)
        norm = target_scores.sum().clamp(min=1.0)
        cls_loss = F.binary_cross_entropy_with_logits(logits, target_scores, reduction="sum")

        # Targets for every point (cheap: P is small), then the positives' rows.
        matched_boxes = _gather(gt.boxes.float(), assign.matched_gt)  # [B, P, 4]
        reg_max = box_logits.shape[-1]
        distances = box_coder.encode(grid, matched_boxes).clamp(0, reg_max - 1 - 0.01)
        pos = assign.pos_mask
        weight = target_scores.sum(-1)[pos]
        ciou = ciou_loss(pred_boxes[pos], matched_boxes[pos])
        dfl = distribution_focal_loss(box_logits[pos], distances[pos]).mean(-1)
        return {
            "classification": self.classification_weight * cls_loss / norm,
            "box_regression": self.box_weight * (ciou * weight).sum() / norm,
            "distribution_focal": self.dfl_weight * (dfl * weight).sum() / norm,
        }
