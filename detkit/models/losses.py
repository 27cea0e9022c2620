"""SSD's MultiBox loss, batched over images: match default boxes to ground truth, pick hard
negatives with the sampler, then ``(L_conf + alpha * L_loc) / N`` with ``N`` matched boxes."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detkit.matching import match_priors
from detkit.models.softmax import per_prior_cross_entropy
from detkit.ops import giou_loss
from detkit.structures import PaddedTargets, with_padding_slot

BOX_LOSSES = ("smooth_l1", "giou")


class MultiBoxLoss(nn.Module):
    """Matching + hard-negative mining + softmax CE + smooth L1, for a whole batch at once.

    ``loss(outputs, priors, box_coder, gt)``: the head's :class:`~detkit.models.heads.ssd.
    SSDOutput`, the default boxes, the detector's box coder and the padded ground truth.

    Args:
        matcher: called by :func:`detkit.matching.match_priors` (e.g. ``SSDMatcher(0.5)``).
        negative_sampler: ``(conf_loss [B, P], positive_mask [B, P]) -> negative_mask``
            (e.g. ``HardNegativeSampler(3)``).
        alpha: weight of the localisation term (1 in the paper).
        smooth_l1_beta: transition point of the smooth L1 (1, as in the paper and torchvision).
        fused_matching: passed to ``match_priors`` as ``fused``; True (default) never builds the
            ``[B, M, P]`` IoU matrix, which on CPU is several times faster at SSD's P = 8732.
        box_loss: ``"smooth_l1"`` (the paper: smooth L1 on the coder's deltas) or ``"giou"``
            (``1 - GIoU`` of the decoded box and its object, one term per matched box; scores
            the overlap that COCO's AP75 measures rather than each side on its own).
    """

    def __init__(
        self,
        matcher: object,
        negative_sampler: object,
        alpha: float = 1.0,
        smooth_l1_beta: float = 1.0,
        fused_matching: bool | None = True,
        box_loss: str = "smooth_l1",
    ) -> None:
        super().__init__()
        if box_loss not in BOX_LOSSES:
            raise ValueError(f"MultiBoxLoss: box_loss={box_loss!r} is not one of {BOX_LOSSES}")
        self.box_loss = box_loss
        self.matcher = matcher
        self.negative_sampler = negative_sampler
        self.alpha = float(alpha)
        self.smooth_l1_beta = float(smooth_l1_beta)
        self.fused_matching = fused_matching

    def forward(self, outputs, priors: Tensor, box_coder, gt: PaddedTargets) -> dict[str, Tensor]:
        """Losses ``{"box_regression", "classification"}`` (each already divided by ``N``).

        ``outputs.class_logits [B, P, C + 1]`` (background at 0), ``outputs.box [B, P, 4]``,
        ``priors [P, 4]`` xyxy pixels, ``gt`` padded targets with labels in ``0..C-1``.
        """
        cls_logits, box_deltas = outputs.class_logits, outputs.box
        gt = with_padding_slot(gt)
        match = match_priors(priors, gt, self.matcher, fused=self.fused_matching)
        positive = match.labels == 1
        batch_idx, prior_idx = positive.nonzero(as_tuple=True)
        gt_idx = match.matched_gt[batch_idx, prior_idx]

        # Labels shift by one here: class c is logit c + 1, logit 0 is background.
        cls_target = torch.zeros(positive.shape, dtype=torch.int64, device=cls_logits.device)
        cls_target[batch_idx, prior_idx] = gt.labels[batch_idx, gt_idx] + 1
        conf_loss = per_prior_cross_entropy(cls_logits.float(), cls_target)
        negative = self.negative_sampler(conf_loss.detach(), positive) & (match.labels == 0)

        matched_boxes = gt.boxes[batch_idx, gt_idx]
        if self.box_loss == "giou":
            decoded = box_coder.decode(priors[prior_idx], box_deltas[batch_idx, prior_idx].float())
            loc_loss = giou_loss(decoded, matched_boxes.float(), reduction="sum")
        else:
            encoded = box_coder.encode(priors[prior_idx], matched_boxes)
            loc_loss = F.smooth_l1_loss(
                box_deltas[batch_idx, prior_idx].float(),
                encoded.float(),
                beta=self.smooth_l1_beta,
                reduction="sum",
            )
        # N = 0 gives 0 / 1 for both terms: no positives and no negatives are selected.
        num_matched = positive.sum().clamp(min=1).to(conf_loss.dtype)
        selected = (positive | negative).to(conf_loss.dtype)
        return {
            "box_regression": self.alpha * loc_loss / num_matched,
            "classification": (conf_loss * selected).sum() / num_matched,
        }
