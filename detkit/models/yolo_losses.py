"""YOLO losses, batched over padded ground truth (no loop over images).

Both read the raw head output and the head's geometry (grid, priors, coder); assignment comes
from :mod:`detkit.matching` (``assign_yolov1`` / ``assign_yolov3``).
"""

from __future__ import annotations

from collections.abc import Sequence

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

    ``box``: ``lambda_coord`` x squared error of (x, y, sqrt w, sqrt h) of responsible
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

    def forward(
        self, raw, gt: PaddedTargets, image_size: Sequence[int], head: nn.Module
    ) -> dict[str, Tensor]:

        gt = with_padding_slot(gt)
        pred_boxes = head.decode_boxes(raw, image_size).detach()
        assign = assign_yolov1(gt, head.grid_size, image_size, pred_boxes)
        cell_boxes = _gather(gt.boxes.float(), assign.matched_gt)  # [B, S, S, 4]
        cell_labels = _gather(gt.labels.clamp(min=0), assign.matched_gt)  # [B, S, S]
        target = head.coder.encode(cell_boxes, head.cell_xy(cell_boxes.device)[:, :, 0], image_size)

        resp = assign.responsible.to(raw.codes.dtype)  # [B, S, S, K]
        coord_err = (raw.codes - target[..., None, :]).square().sum(-1)
        conf_obj = (raw.confidence - assign.pred_iou.to(raw.confidence.dtype)).square()
        conf_noobj = raw.confidence.square()
        one_hot = F.one_hot(cell_labels, head.num_classes).to(raw.class_prob.dtype)
        class_err = (raw.class_prob - one_hot).square().sum(-1)

        batch = raw.codes.shape[0]
        return {
            "box": self.lambda_coord * (coord_err * resp).sum() / batch,
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

    def forward(
        self, raw: Tensor, gt: PaddedTargets, image_size: Sequence[int], head: nn.Module
    ) -> dict[str, Tensor]:

        gt = with_padding_slot(gt)
        raw = raw.float()
        pred_boxes = head.decode_boxes(raw, image_size)
        assign = assign_yolov3(
            gt, head.priors, image_size, pred_boxes.detach(), self.ignore_threshold
        )
        pos = assign.pos_mask
        num_pos = pos.sum().clamp(min=1).to(raw.dtype)

        obj_target = pos.to(raw.dtype)
        obj_weight = pos.to(raw.dtype) + self.noobj_weight * assign.neg_mask.to(raw.dtype)
        obj_loss = F.binary_cross_entropy_with_logits(
            raw[..., 4], obj_target, weight=obj_weight, reduction="sum"
        )

        batch_idx, prior_idx = pos.nonzero(as_tuple=True)
        gt_idx = assign.matched_gt[batch_idx, prior_idx]
        gt_boxes = gt.boxes[batch_idx, gt_idx].float()
        one_hot = F.one_hot(gt.labels[batch_idx, gt_idx], head.num_classes).to(raw.dtype)
        pos_raw = raw[batch_idx, prior_idx]
        cls_loss = F.binary_cross_entropy_with_logits(pos_raw[:, 5:], one_hot, reduction="sum")
        if self.box_loss == "offsets":
            box_loss = self._offsets_loss(pos_raw, gt_boxes, prior_idx, image_size, head)
        else:
            fn = giou_loss if self.box_loss == "giou" else ciou_loss
            box_loss = fn(pred_boxes[batch_idx, prior_idx], gt_boxes, reduction="sum")
        return {
            "box": self.box_weight * box_loss / num_pos,
            "objectness": self.objectness_weight * obj_loss / num_pos,
            "classification": self.classification_weight * cls_loss / num_pos,
        }

    @staticmethod
    def _offsets_loss(
        pos_raw: Tensor, gt_boxes: Tensor, prior_idx: Tensor, image_size: Sequence[int], head
    ) -> Tensor:
        g = head.grid(image_size, pos_raw.device)
        target = head.coder.encode(
            gt_boxes, g.grid_xy[prior_idx], g.anchor_wh[prior_idx], g.stride[prior_idx]
        )
        # Small boxes get up to twice the weight: an offset error costs them more IoU.
        area = (gt_boxes[:, 2] - gt_boxes[:, 0]) * (gt_boxes[:, 3] - gt_boxes[:, 1])
        scale = 2.0 - area / float(image_size[0] * image_size[1])
        xy = F.binary_cross_entropy_with_logits(
            pos_raw[:, :2], target[:, :2].clamp(0, 1), reduction="none"
        ).sum(-1)
        wh = (pos_raw[:, 2:4] - target[:, 2:]).square().sum(-1)
        return (scale * (xy + wh)).sum()
