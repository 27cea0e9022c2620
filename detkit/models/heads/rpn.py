"""Region Proposal Network (Ren et al., 2015, section 3.1): a 3x3 conv and two sibling 1x1
convs over anchors, trained with the 0.7 / 0.3 anchor rule and 256 sampled anchors per image;
proposals are decoded, clipped, filtered by size and NMS per level.

Everything is batched over images: anchor labelling and sampling over padded ground truth,
proposals as padded ``[B, K, 4]`` with a count per image (one ``multiclass_nms`` call for the
per-level NMS of every image). Module names of :class:`RPNHead` mirror torchvision's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detkit.matching import MatchResult, match_priors
from detkit.ops import box_iou, clip_boxes, large_enough, multiclass_nms
from detkit.structures import PaddedTargets, with_padding_slot

Size = tuple[int, int]


class RPNHead(nn.Module):
    """Shared 3x3 conv + ReLU, then objectness (1 logit) and 4 deltas per anchor.

    ``forward(features)`` returns ``objectness [B, A]`` and ``deltas [B, A, 4]`` flattened
    level by level, row by row, column by column, then anchor, the anchor generator's order.
    """

    def __init__(self, in_channels: int, num_anchors: int, conv_depth: int = 1) -> None:
        super().__init__()
        self.num_anchors = int(num_anchors)
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
    """Anchors, RPN losses and proposals, batched over images.

    Args:
        anchor_generator: :class:`detkit.matching.AnchorGenerator`.
        head: :class:`RPNHead` (``num_anchors`` = the generator's anchors per location).
        matcher: anchor labelling, e.g. ``Matcher(0.7, 0.3, allow_low_quality_matches=True)``.
        sampler: e.g. ``BalancedPositiveNegativeSampler(256, 0.5)``.
        box_coder: e.g. ``DeltaXYWHCoder((1, 1, 1, 1))``.
        topk_candidates_per_level_train/test: best-scoring anchors of each level (per image)
            that enter NMS.
        proposals_per_image_train/test: proposals kept per image after NMS.
        nms_threshold: IoU threshold of the per-level NMS.
        score_threshold: proposals with sigmoid objectness below this are dropped.
        min_size: proposals narrower or lower than this (pixels) are dropped.
        remove_cross_boundary: ignore anchors crossing the image border when training (the
            paper; torchvision keeps them, so ``from_torchvision`` turns it off).
        smooth_l1_beta: transition of the box loss (1/9 as torchvision/Detectron).
    """

    def __init__(
        self,
        anchor_generator: object,
        head: nn.Module,
        matcher: object,
        sampler: object,
        box_coder: object,
        topk_candidates_per_level_train: int = 2000,
        proposals_per_image_train: int = 2000,
        topk_candidates_per_level_test: int = 1000,
        proposals_per_image_test: int = 1000,
        nms_threshold: float = 0.7,
        score_threshold: float = 0.0,
        min_size: float = 1e-3,
        remove_cross_boundary: bool = False,
        smooth_l1_beta: float = 1.0 / 9,
    ) -> None:
        super().__init__()
        per_location = set(anchor_generator.num_anchors_per_location())
        head_anchors = getattr(head, "num_anchors", None)
        if head_anchors is not None and per_location != {head_anchors}:
            raise ValueError(
                f"RPN head predicts {head_anchors} anchors per location but the anchor "
                f"generator makes {sorted(per_location)}"
            )
        self.anchor_generator = anchor_generator
        self.head = head
        self.matcher = matcher
        self.sampler = sampler
        self.box_coder = box_coder
        self.topk_candidates_per_level = {
            "train": int(topk_candidates_per_level_train),
            "test": int(topk_candidates_per_level_test),
        }
        self.proposals_per_image = {
            "train": int(proposals_per_image_train),
            "test": int(proposals_per_image_test),
        }
        self.nms_threshold = float(nms_threshold)
        self.score_threshold = float(score_threshold)
        self.min_size = float(min_size)
        self.remove_cross_boundary = bool(remove_cross_boundary)
        self.smooth_l1_beta = float(smooth_l1_beta)
        self._anchors: dict[tuple, tuple[Tensor, list[int]]] = {}

    def anchors(self, image_shape: Size, features: Sequence[Tensor]) -> tuple[Tensor, list[int]]:
        """Anchors ``[A, 4]`` for the padded image shape and the anchor count of each level."""
        sizes = tuple(tuple(int(s) for s in f.shape[-2:]) for f in features)
        key = (tuple(image_shape), sizes, str(features[0].device))
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
        image_sizes: Tensor,
        gt: PaddedTargets | None = None,
    ) -> tuple[tuple[Tensor, Tensor], dict[str, Tensor]]:
        """``(proposals [B, K, 4], num_proposals [B])`` (see :meth:`propose`) and, with
        ``gt``, the RPN losses. ``image_sizes [B, 2]``: each image's valid (h, w)."""
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
        image_sizes: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """Top-k anchors per level, decoded, clipped, small/low removed, NMS per level, the
        best ``proposals_per_image`` kept: padded ``proposals [B, K, 4]`` (best first) and
        ``num_proposals [B]``. The per-level NMS of all images is one ``multiclass_nms`` call
        with the levels as its classes."""
        mode = "train" if self.training else "test"
        top_idx, levels, offset = [], [], 0
        for level, count in enumerate(counts):
            k = min(self.topk_candidates_per_level[mode], count)
            top_idx.append(objectness[:, offset : offset + count].topk(k, dim=1).indices + offset)
            levels += [level] * k
            offset += count
        idx = torch.cat(top_idx, 1)  # [B, N]
        scores = objectness.gather(1, idx).sigmoid()
        chosen = deltas.gather(1, idx.unsqueeze(-1).expand(-1, -1, 4))
        boxes = clip_boxes(self.box_coder.decode(anchors[idx], chosen.float()), image_sizes)
        usable = large_enough(boxes, self.min_size) & (scores >= self.score_threshold)
        level_of = torch.tensor(levels, device=boxes.device)
        own_level = level_of[:, None] == torch.arange(len(counts), device=boxes.device)
        by_level = torch.where(own_level & usable[..., None], scores[..., None], -1.0)
        proposals, _, _, num = multiclass_nms(
            boxes, by_level, -0.5, self.nms_threshold, self.proposals_per_image[mode]
        )
        return proposals, num

    def label_anchors(self, anchors: Tensor, gt: PaddedTargets, image_sizes: Tensor):
        """:class:`detkit.matching.MatchResult` of every anchor (batched over images)."""

        if not self.remove_cross_boundary:
            return match_priors(anchors, gt, self.matcher)
        inside = torch.stack(
            [self.anchor_generator.inside_image(anchors, size.tolist()) for size in image_sizes]
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
        image_sizes: Tensor,
    ) -> dict[str, Tensor]:
        """``rpn_objectness`` (BCE over sampled anchors) and ``rpn_box_regression`` (smooth L1
        over the sampled positives, divided by the number of sampled anchors, as torchvision)."""
        gt = with_padding_slot(gt)
        match = self.label_anchors(anchors, gt, image_sizes)
        pos, neg = self.sampler(match.labels)
        sampled = pos | neg
        if not bool(sampled.any()):
            zero = objectness.sum() * 0.0 + deltas.sum() * 0.0
            return {"rpn_objectness": zero, "rpn_box_regression": zero}
        objectness_loss = F.binary_cross_entropy_with_logits(
            objectness[sampled].float(), pos[sampled].float()
        )
        b_idx, a_idx = pos.nonzero(as_tuple=True)
        matched = gt.boxes[b_idx, match.matched_gt[b_idx, a_idx]]
        targets = self.box_coder.encode(anchors[a_idx], matched)
        box_loss = (
            F.smooth_l1_loss(
                deltas[b_idx, a_idx].float(), targets, beta=self.smooth_l1_beta, reduction="sum"
            )
            / sampled.sum()
        )
        return {"rpn_objectness": objectness_loss, "rpn_box_regression": box_loss}
