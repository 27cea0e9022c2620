"""Region Proposal Network (Ren et al., 2015, section 3.1): a 3x3 conv and two sibling 1x1
convs over anchors, trained with the 0.7 / 0.3 anchor rule and 256 sampled anchors per image;
proposals are decoded, clipped, filtered by size and NMS per level.

Anchor labelling and sampling are batched over images (padded ground truth); only the final
per-image NMS loops over images. Module names of :class:`RPNHead` mirror torchvision's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detkit.matching import (
    BalancedPositiveNegativeSampler,
    DeltaXYWHCoder,
    Matcher,
    MatchResult,
    match_priors,
)
from detkit.ops import batched_nms, box_iou, clip_boxes, remove_small_boxes
from detkit.structures import PaddedTargets, with_padding_slot

Size = tuple[int, int]


class RPNHead(nn.Module):
    """Shared 3x3 conv + ReLU, then objectness (1 logit) and 4 deltas per anchor.

    ``forward(features)`` returns ``objectness [B, A]`` and ``deltas [B, A, 4]`` flattened
    level by level, row by row, column by column, then anchor, the anchor generator's order.
    """

    def __init__(self, in_channels: int, num_anchors: int, conv_depth: int = 1) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            *(
                nn.Sequential(nn.Conv2d(in_channels, in_channels, 3, padding=1), nn.ReLU(True))
                for _ in range(conv_depth)
            )
        )
        self.cls_logits = nn.Conv2d(in_channels, num_anchors, kernel_size=1)
        self.bbox_pred = nn.Conv2d(in_channels, num_anchors * 4, kernel_size=1)
        for layer in self.modules():
            if isinstance(layer, nn.Conv2d):
                nn.init.normal_(layer.weight, std=0.01)
                nn.init.zeros_(layer.bias)

    def forward(self, features: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        logits, deltas = [], []
        for feature in features:
            t = self.conv(feature)
            obj, box = self.cls_logits(t), self.bbox_pred(t)
            b, a, h, w = obj.shape
            logits.append(obj.permute(0, 2, 3, 1).reshape(b, -1))
            deltas.append(box.view(b, a, 4, h, w).permute(0, 3, 4, 1, 2).reshape(b, -1, 4))
        return torch.cat(logits, 1), torch.cat(deltas, 1)


class RegionProposalNetwork(nn.Module):
    """Anchors, RPN losses and proposals.

    Args:
        anchor_generator: :class:`detkit.matching.AnchorGenerator`.
        head: :class:`RPNHead`; ``None`` lets the detector build it from the backbone.
        matcher: anchor labelling (``Matcher(0.7, 0.3, allow_low_quality_matches=True)``).
        sampler: ``BalancedPositiveNegativeSampler(256, 0.5)``.
        box_coder: ``DeltaXYWHCoder((1, 1, 1, 1))``.
        pre_nms_top_n_train/test: best-scoring anchors kept per level before NMS.
        post_nms_top_n_train/test: proposals kept per image after NMS.
        nms_thresh: IoU threshold of the per-level NMS.
        score_thresh: proposals with sigmoid objectness below this are dropped.
        min_size: proposals narrower or lower than this (pixels) are dropped.
        remove_cross_boundary: ignore anchors crossing the image border when training (the
            paper; torchvision keeps them, so ``from_torchvision`` turns it off).
        smooth_l1_beta: transition of the box loss (1/9 as torchvision/Detectron).
    """

    def __init__(
        self,
        anchor_generator: object,
        head: nn.Module | None = None,
        matcher: object | None = None,
        sampler: object | None = None,
        box_coder: object | None = None,
        pre_nms_top_n_train: int = 2000,
        post_nms_top_n_train: int = 2000,
        pre_nms_top_n_test: int = 1000,
        post_nms_top_n_test: int = 1000,
        nms_thresh: float = 0.7,
        score_thresh: float = 0.0,
        min_size: float = 1e-3,
        remove_cross_boundary: bool = False,
        smooth_l1_beta: float = 1.0 / 9,
    ) -> None:
        super().__init__()

        self.anchor_generator = anchor_generator
        self.head = head
        self.matcher = matcher if matcher is not None else Matcher(0.7, 0.3, True)
        self.sampler = sampler if sampler is not None else BalancedPositiveNegativeSampler(256, 0.5)
        self.box_coder = box_coder if box_coder is not None else DeltaXYWHCoder()
        self.pre_nms_top_n = {"train": int(pre_nms_top_n_train), "test": int(pre_nms_top_n_test)}
        self.post_nms_top_n = {"train": int(post_nms_top_n_train), "test": int(post_nms_top_n_test)}
        self.nms_thresh = float(nms_thresh)
        self.score_thresh = float(score_thresh)
        self.min_size = float(min_size)
        self.remove_cross_boundary = bool(remove_cross_boundary)
        self.smooth_l1_beta = float(smooth_l1_beta)
        self._anchors: dict[tuple, tuple[Tensor, list[int]]] = {}

    def anchors(self, image_shape: Size, features: Sequence[Tensor]) -> tuple[Tensor, list[int]]:
        """Anchors ``[A, 4]`` for the padded image shape and the anchor count of each level."""
        sizes = tuple(tuple(int(s) for s in f.shape[-2:]) for f in features)
        key = (tuple(image_shape), sizes, features[0].device)
        if key not in self._anchors:
            anchors = self.anchor_generator(tuple(image_shape), [list(s) for s in sizes])
            per_loc = self.anchor_generator.num_anchors_per_location()
            counts = [h * w * a for (h, w), a in zip(sizes, per_loc, strict=True)]
            self._anchors[key] = (anchors.to(features[0].device, torch.float32), counts)
        return self._anchors[key]

    def forward(
        self,
        features: Sequence[Tensor],
        image_shape: Size,
        image_sizes: Sequence[Size],
        gt: PaddedTargets | None = None,
    ) -> tuple[list[Tensor], dict[str, Tensor]]:
        """Proposals (one ``[K, 4]`` tensor per image) and, with ``gt``, the RPN losses."""
        if self.head is None:
            raise ValueError("RegionProposalNetwork.head is None: build it (FasterRCNN does)")
        objectness, deltas = self.head(features)
        anchors, counts = self.anchors(image_shape, features)
        if anchors.shape[0] != objectness.shape[1]:
            raise ValueError(
                f"anchor_generator made {anchors.shape[0]} anchors but the RPN head predicts "
                f"{objectness.shape[1]}: its num_anchors does not match the generator"
            )
        proposals = self.propose(objectness.detach(), deltas.detach(), anchors, counts, image_sizes)
        losses = {} if gt is None else self.loss(objectness, deltas, anchors, gt, image_sizes)
        return proposals, losses

    @torch.no_grad()
    def propose(
        self,
        objectness: Tensor,
        deltas: Tensor,
        anchors: Tensor,
        counts: Sequence[int],
        image_sizes: Sequence[Size],
    ) -> list[Tensor]:
        """Top-n anchors per level, decoded, clipped, small/low removed, NMS per level."""

        mode = "train" if self.training else "test"
        top_idx, levels, offset = [], [], 0
        for level, count in enumerate(counts):
            k = min(self.pre_nms_top_n[mode], count)
            top_idx.append(objectness[:, offset : offset + count].topk(k, dim=1).indices + offset)
            levels.append(torch.full((k,), level, dtype=torch.int64, device=anchors.device))
            offset += count
        idx = torch.cat(top_idx, 1)  # [B, K]
        level_ids = torch.cat(levels)
        scores = objectness.gather(1, idx).sigmoid()
        chosen = deltas.gather(1, idx.unsqueeze(-1).expand(-1, -1, 4))
        boxes = self.box_coder.decode(chosen.float(), anchors[idx])
        proposals = []
        for b, s, size in zip(boxes, scores, image_sizes, strict=True):
            b = clip_boxes(b, size)
            keep = remove_small_boxes(b, self.min_size)
            b, s, lv = b[keep], s[keep], level_ids[keep]
            keep = torch.where(s >= self.score_thresh)[0]
            b, s, lv = b[keep], s[keep], lv[keep]
            keep = batched_nms(b, s, lv, self.nms_thresh)[: self.post_nms_top_n[mode]]
            proposals.append(b[keep])
        return proposals

    def label_anchors(self, anchors: Tensor, gt: PaddedTargets, image_sizes: Sequence[Size]):
        """:class:`detkit.matching.MatchResult` of every anchor (batched over images)."""

        if not self.remove_cross_boundary:
            return match_priors(anchors, gt, self.matcher)
        inside = torch.stack(
            [self.anchor_generator.remove_cross_boundary(anchors, size) for size in image_sizes]
        )
        batch, most = gt.mask.shape
        iou = box_iou(gt.boxes.reshape(-1, 4), anchors).view(batch, most, -1)
        # Outside anchors can neither be some ground truth's best anchor nor a negative.
        result = self.matcher(iou.masked_fill(~inside[:, None, :], -1.0), gt.mask)
        labels = result.labels.masked_fill(~inside, -1)
        return MatchResult(result.matched_gt, labels, result.max_iou)

    def loss(
        self,
        objectness: Tensor,
        deltas: Tensor,
        anchors: Tensor,
        gt: PaddedTargets,
        image_sizes: Sequence[Size],
    ) -> dict[str, Tensor]:
        """``rpn_objectness`` (BCE over sampled anchors) and ``rpn_box`` (smooth L1 over the
        sampled positives, divided by the number of sampled anchors, as torchvision)."""
        gt = with_padding_slot(gt)
        match = self.label_anchors(anchors, gt, image_sizes)
        pos, neg = self.sampler(match.labels)
        sampled = pos | neg
        if not bool(sampled.any()):
            zero = objectness.sum() * 0.0 + deltas.sum() * 0.0
            return {"rpn_objectness": zero, "rpn_box": zero}
        objectness_loss = F.binary_cross_entropy_with_logits(
            objectness[sampled].float(), pos[sampled].float()
        )
        b_idx, a_idx = pos.nonzero(as_tuple=True)
        matched = gt.boxes[b_idx, match.matched_gt[b_idx, a_idx]]
        targets = self.box_coder.encode(matched, anchors[a_idx])
        box_loss = (
            F.smooth_l1_loss(
                deltas[b_idx, a_idx].float(), targets, beta=self.smooth_l1_beta, reduction="sum"
            )
            / sampled.sum()
        )
        return {"rpn_objectness": objectness_loss, "rpn_box": box_loss}
