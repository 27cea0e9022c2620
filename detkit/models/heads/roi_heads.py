"""Fast R-CNN RoI heads (Girshick, 2015) as Faster R-CNN uses them: proposals (plus ground
truth when training) matched at 0.5 and sampled 512 per image at 1:3, pooled to 7x7,
two fully connected layers, then C + 1 class scores and class-specific boxes.

Module names of :class:`TwoMLPHead`/:class:`FastRCNNPredictor` mirror torchvision's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detkit.ops import box_iou, clip_boxes, large_enough, multiclass_nms, roi_align, roi_pool
from detkit.structures import PaddedTargets

Size = tuple[int, int]


class RoIPooler(nn.Module):
    """Pools ``[R, C, s, s]`` features for RoIs ``[R, 5]`` (batch index, x1, y1, x2, y2).

    With several maps, each RoI goes to level ``floor(4 + log2(sqrt(area) / 224))`` clamped to
    the available levels (FPN paper eq. 1; torchvision's ``MultiScaleRoIAlign`` mapping). Map
    scales are inferred as powers of two from the padded image size, like torchvision (which
    uses the largest image of the batch; the rounding makes them agree).

    Args:
        output_size: pooled size (7).
        sampling_ratio: ``roi_align`` samples per bin (2 in torchvision; ignored by pool).
        mode: ``"align"`` (RoIAlign) or ``"pool"`` (the paper's max RoI pooling).
        levels: indices of the backbone maps to pool from (FPN: ``[0, 1, 2, 3]``, not the
            extra pooled level); ``None`` uses all maps.
    """

    def __init__(
        self,
        output_size: int = 7,
        sampling_ratio: int = 2,
        mode: str = "align",
        levels: Sequence[int] | None = None,
        canonical_scale: float = 224.0,
        canonical_level: int = 4,
    ) -> None:
        super().__init__()
        if mode not in ("align", "pool"):
            raise ValueError(f"RoIPooler mode must be 'align' or 'pool', got {mode!r}")
        self.output_size = int(output_size)
        self.sampling_ratio = int(sampling_ratio)
        self.mode = mode
        self.levels = None if levels is None else [int(i) for i in levels]
        self.canonical_scale = float(canonical_scale)
        self.canonical_level = int(canonical_level)

    def pool(self, feature: Tensor, rois: Tensor, scale: float) -> Tensor:
        """RoIAlign (or RoIPool) of ``rois [R, 5]`` on one map of the given ``scale``."""
        size = (self.output_size, self.output_size)
        if self.mode == "pool":
            return roi_pool(feature, rois, size, scale)
        return roi_align(feature, rois, size, scale, self.sampling_ratio)

    def forward(self, features: Sequence[Tensor], rois: Tensor, image_shape: Size) -> Tensor:
        """``[R, C, s, s]`` for ``rois [R, 5]`` on a batch of padded ``image_shape`` (h, w)."""
        maps = list(features) if self.levels is None else [features[i] for i in self.levels]
        scales = [2.0 ** round(math.log2(m.shape[-2] / image_shape[0])) for m in maps]
        rois = rois.to(maps[0].dtype)
        if len(maps) == 1:
            return self.pool(maps[0], rois, scales[0])
        k_min, k_max = -math.log2(scales[0]), -math.log2(scales[-1])
        size = torch.sqrt((rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2]))
        level = torch.floor(
            self.canonical_level + torch.log2(size / self.canonical_scale) + 1e-6
        ).clamp(min=int(k_min), max=int(k_max))
        level = level.to(torch.int64) - int(k_min)
        out = maps[0].new_zeros(
            (rois.shape[0], maps[0].shape[1], self.output_size, self.output_size)
        )
        for i, (feature, scale) in enumerate(zip(maps, scales, strict=True)):
            idx = torch.where(level == i)[0]
            out[idx] = self.pool(feature, rois[idx], scale).to(out.dtype)
        return out


class TwoMLPHead(nn.Module):
    """Flatten the pooled ``[R, in_channels, resolution, resolution]`` features, then two fully
    connected layers with ReLU (fc6, fc7)."""

    def __init__(self, in_channels: int, resolution: int = 7, representation_size: int = 1024):
        super().__init__()
        self.fc6 = nn.Linear(int(in_channels) * int(resolution) ** 2, representation_size)
        self.fc7 = nn.Linear(representation_size, representation_size)
        self.out_channels = int(representation_size)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.fc7(F.relu(self.fc6(x.flatten(1)))))


class FastRCNNPredictor(nn.Module):
    """Class logits over ``num_classes + 1`` (background added here, at index 0) and
    class-specific box deltas."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        if int(num_classes) < 1:
            raise ValueError(f"FastRCNNPredictor: num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.cls_score = nn.Linear(in_channels, self.num_classes + 1)
        self.bbox_pred = nn.Linear(in_channels, (self.num_classes + 1) * 4)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = x.flatten(1)
        return self.cls_score(x), self.bbox_pred(x)


class RoIHeads(nn.Module):
    """Sampling, box head, losses and per-class selection of the second stage.

    Args:
        box_pooler: :class:`RoIPooler`.
        box_head: e.g. :class:`TwoMLPHead`.
        box_predictor: :class:`FastRCNNPredictor` (background added inside it).
        matcher: e.g. ``Matcher(0.5, 0.5, False)``; sampler: e.g.
            ``BalancedPositiveNegativeSampler(512, 0.25)``; box_coder: e.g.
            ``DeltaXYWHCoder((10, 10, 5, 5))``.
        score_threshold, nms_threshold, detections_per_image, min_size: inference.
        add_gt_as_proposals: append ground truth to the proposals when training.
        smooth_l1_beta: transition of the box loss (1/9 as torchvision).
    """

    def __init__(
        self,
        box_pooler: RoIPooler,
        box_head: nn.Module,
        box_predictor: nn.Module,
        matcher: object,
        sampler: object,
        box_coder: object,
        score_threshold: float = 0.05,
        nms_threshold: float = 0.5,
        detections_per_image: int = 100,
        min_size: float = 1e-2,
        add_gt_as_proposals: bool = True,
        smooth_l1_beta: float = 1.0 / 9,
    ) -> None:
        super().__init__()
        self.box_pooler = box_pooler
        self.box_head = box_head
        self.box_predictor = box_predictor
        self.matcher = matcher
        self.sampler = sampler
        self.box_coder = box_coder
        self.score_threshold = float(score_threshold)
        self.nms_threshold = float(nms_threshold)
        self.detections_per_image = int(detections_per_image)
        self.min_size = float(min_size)
        self.add_gt_as_proposals = bool(add_gt_as_proposals)
        self.smooth_l1_beta = float(smooth_l1_beta)

    def predict(self, features: Sequence[Tensor], rois: Tensor, image_shape: Size):
        """Class logits ``[R, C + 1]`` and class-specific deltas ``[R, (C + 1) * 4]``."""
        pooled = self.box_pooler(features, rois, image_shape)
        return self.box_predictor(self.box_head(pooled))

    # ----- inference ------------------------------------------------------------------
    def candidates(
        self,
        features: Sequence[Tensor],
        proposals: Tensor,
        num_proposals: Tensor,
        image_shape: Size,
        image_sizes: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """Class-specific boxes ``[B, K, C, 4]`` (decoded, clipped to each image) and scores
        ``[B, K, C]`` (softmax without background; 0 for padded proposal slots) of the padded
        ``proposals [B, K, 4]``. Only the real proposals go through the box head."""
        batch, slots = proposals.shape[:2]
        real = torch.arange(slots, device=proposals.device)[None, :] < num_proposals[:, None]
        b_idx, k_idx = real.nonzero(as_tuple=True)
        rois = torch.cat([b_idx[:, None].to(proposals.dtype), proposals[b_idx, k_idx]], dim=1)
        logits, deltas = self.predict(features, rois, image_shape)
        num_cls = logits.shape[-1]  # C + 1, background first
        boxes = self.box_coder.decode(
            rois[:, None, 1:].float(), deltas.float().view(-1, num_cls, 4)
        )
        boxes = clip_boxes(boxes[:, 1:], image_sizes[b_idx])
        scores = F.softmax(logits.float(), -1)[:, 1:]
        out_boxes = boxes.new_zeros((batch, slots, num_cls - 1, 4))
        out_scores = scores.new_zeros((batch, slots, num_cls - 1))
        out_boxes[b_idx, k_idx] = boxes
        out_scores[b_idx, k_idx] = scores
        return out_boxes, out_scores

    def select(self, boxes: Tensor, scores: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Small boxes out, then ``multiclass_nms`` on class-specific boxes (padded outputs)."""
        scores = torch.where(large_enough(boxes, self.min_size), scores, -1.0)
        return multiclass_nms(boxes, scores, **self.nms_settings())

    def nms_settings(self) -> dict:
        """The selection's settings, as ``multiclass_nms`` takes them."""
        return {
            "score_threshold": self.score_threshold,
            "iou_threshold": self.nms_threshold,
            "max_detections": self.detections_per_image,
        }

    # ----- training -------------------------------------------------------------------
    def sample(self, proposals: Sequence[Tensor], gt: PaddedTargets):
        """Sampled RoIs ``[R, 5]``, class targets ``[R]`` (0 = background) and box targets
        ``[R, 4]`` (zeros for background), batched over images."""

        batch, most = gt.mask.shape
        if self.add_gt_as_proposals:
            proposals = [torch.cat([p, gt.boxes[i][gt.mask[i]]]) for i, p in enumerate(proposals)]
        num = max(1, max(len(p) for p in proposals))
        boxes = gt.boxes.new_zeros((batch, num, 4))
        valid = torch.zeros(batch, num, dtype=torch.bool, device=gt.boxes.device)
        iou = gt.boxes.new_zeros((batch, most, num))
        for i, p in enumerate(proposals):
            boxes[i, : len(p)], valid[i, : len(p)] = p, True
            if most and len(p):
                iou[i, :, : len(p)] = box_iou(gt.boxes[i], p)
        match = self.matcher(iou, gt.mask)
        pos, neg = self.sampler(match.labels.masked_fill(~valid, -1))
        b_idx, k_idx = (pos | neg).nonzero(as_tuple=True)
        rois = torch.cat([b_idx[:, None].to(boxes.dtype), boxes[b_idx, k_idx]], dim=1)
        gt_idx = match.matched_gt[b_idx, k_idx]
        is_pos = pos[b_idx, k_idx]
        if most:
            classes = torch.where(is_pos, gt.labels[b_idx, gt_idx] + 1, 0)
            matched = gt.boxes[b_idx, gt_idx]
        else:
            classes = torch.zeros_like(b_idx)
            matched = rois[:, 1:]
        targets = self.box_coder.encode(rois[is_pos, 1:], matched[is_pos])
        return rois, classes, targets

    def loss(
        self, features, proposals: Sequence[Tensor], image_shape: Size, gt: PaddedTargets
    ) -> dict[str, Tensor]:
        """``classification`` (CE over sampled RoIs) and ``box_regression`` (smooth L1 of the
        true class's deltas over positives, divided by the number of sampled RoIs)."""
        rois, classes, targets = self.sample(proposals, gt)
        logits, deltas = self.predict(features, rois, image_shape)
        if len(rois) == 0:
            zero = logits.sum() * 0.0 + deltas.sum() * 0.0
            return {"classification": zero, "box_regression": zero}
        cls_loss = F.cross_entropy(logits.float(), classes)
        pos = torch.where(classes > 0)[0]
        pos_deltas = deltas.view(len(rois), -1, 4)[pos, classes[pos]]
        box_loss = F.smooth_l1_loss(
            pos_deltas.float(), targets, beta=self.smooth_l1_beta, reduction="sum"
        ) / len(rois)
        return {"classification": cls_loss, "box_regression": box_loss}
