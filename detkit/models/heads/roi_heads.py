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

from detkit.matching import BalancedPositiveNegativeSampler, DeltaXYWHCoder, Matcher
from detkit.ops import batched_nms, box_iou, clip_boxes, remove_small_boxes, roi_align, roi_pool
from detkit.structures import Detections, PaddedTargets

Size = tuple[int, int]


class RoIPooler(nn.Module):
    """Pools ``[R, C, s, s]`` features for RoIs ``[R, 5]`` (batch index, x1, y1, x2, y2).

    With several maps, each RoI goes to level ``floor(4 + log2(sqrt(area) / 224))`` clamped to
    the available levels (FPN paper eq. 1; torchvision's ``MultiScaleRoIAlign`` mapping). Map
    scales are inferred as powers of two from the largest image size, like torchvision.

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

    def _pool(self, feature: Tensor, rois: Tensor, scale: float) -> Tensor:

        size = (self.output_size, self.output_size)
        if self.mode == "pool":
            return roi_pool(feature, rois, size, scale)
        return roi_align(feature, rois, size, scale, self.sampling_ratio)

    def forward(self, features: Sequence[Tensor], rois: Tensor, image_sizes: Sequence[Size]):
        maps = list(features) if self.levels is None else [features[i] for i in self.levels]
        largest = (max(s[0] for s in image_sizes), max(s[1] for s in image_sizes))
        scales = [2.0 ** round(math.log2(m.shape[-2] / largest[0])) for m in maps]
        rois = rois.to(maps[0].dtype)
        if len(maps) == 1:
            return self._pool(maps[0], rois, scales[0])
        k_min, k_max = -math.log2(scales[0]), -math.log2(scales[-1])
        size = torch.sqrt((rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2]))
        level = torch.floor(
            self.canonical_level + torch.log2(size / self.canonical_scale) + 1e-6
        ).clamp(min=int(k_min), max=int(k_max))
        level = level.to(torch.int64) - int(k_min)
        out = maps[0].new_zeros((len(rois), maps[0].shape[1], self.output_size, self.output_size))
        for i, (feature, scale) in enumerate(zip(maps, scales, strict=True)):
            idx = torch.where(level == i)[0]
            out[idx] = self._pool(feature, rois[idx], scale).to(out.dtype)
        return out


class TwoMLPHead(nn.Module):
    """Flatten then two fully connected layers with ReLU (fc6, fc7)."""

    def __init__(self, in_channels: int, representation_size: int = 1024) -> None:
        super().__init__()
        self.fc6 = nn.Linear(in_channels, representation_size)
        self.fc7 = nn.Linear(representation_size, representation_size)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.fc7(F.relu(self.fc6(x.flatten(1)))))


class FastRCNNPredictor(nn.Module):
    """Class logits over ``num_classes`` (background included) and per-class box deltas."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.cls_score = nn.Linear(in_channels, num_classes)
        self.bbox_pred = nn.Linear(in_channels, num_classes * 4)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = x.flatten(1)
        return self.cls_score(x), self.bbox_pred(x)


class RoIHeads(nn.Module):
    """Sampling, box head, losses and per-class post-processing of the second stage.

    Args:
        box_pooler: :class:`RoIPooler`.
        box_head: e.g. :class:`TwoMLPHead`; ``None`` lets the detector build one.
        box_predictor: :class:`FastRCNNPredictor` over ``C + 1``; ``None`` likewise.
        matcher: ``Matcher(0.5, 0.5, False)``; sampler: ``BalancedPositiveNegativeSampler(512,
            0.25)``; box_coder: ``DeltaXYWHCoder((10, 10, 5, 5))``.
        representation_size: width of the default box head.
        score_thresh, nms_thresh, detections_per_img, min_size: inference.
        add_gt_as_proposals: append ground truth to the proposals when training.
        smooth_l1_beta: transition of the box loss (1/9 as torchvision).
    """

    def __init__(
        self,
        box_pooler: RoIPooler | None = None,
        box_head: nn.Module | None = None,
        box_predictor: nn.Module | None = None,
        matcher: object | None = None,
        sampler: object | None = None,
        box_coder: object | None = None,
        representation_size: int = 1024,
        score_thresh: float = 0.05,
        nms_thresh: float = 0.5,
        detections_per_img: int = 100,
        min_size: float = 1e-2,
        add_gt_as_proposals: bool = True,
        smooth_l1_beta: float = 1.0 / 9,
    ) -> None:
        super().__init__()

        self.box_pooler = box_pooler if box_pooler is not None else RoIPooler()
        self.box_head = box_head
        self.box_predictor = box_predictor
        self.matcher = matcher if matcher is not None else Matcher(0.5, 0.5, False)
        self.sampler = (
            sampler if sampler is not None else BalancedPositiveNegativeSampler(512, 0.25)
        )
        self.box_coder = box_coder if box_coder is not None else DeltaXYWHCoder((10, 10, 5, 5))
        self.representation_size = int(representation_size)
        self.score_thresh = float(score_thresh)
        self.nms_thresh = float(nms_thresh)
        self.detections_per_img = int(detections_per_img)
        self.min_size = float(min_size)
        self.add_gt_as_proposals = bool(add_gt_as_proposals)
        self.smooth_l1_beta = float(smooth_l1_beta)

    def build(self, in_channels: int, num_classes: int) -> None:
        """Create the default box head / predictor for ``num_classes`` object classes."""
        if self.box_head is None:
            flat = in_channels * self.box_pooler.output_size**2
            self.box_head = TwoMLPHead(flat, self.representation_size)
        if self.box_predictor is None:
            self.box_predictor = FastRCNNPredictor(self.representation_size, num_classes + 1)

    def predict(self, features: Sequence[Tensor], rois: Tensor, image_sizes: Sequence[Size]):
        pooled = self.box_pooler(features, rois, image_sizes)
        return self.box_predictor(self.box_head(pooled))

    def forward(
        self,
        features: Sequence[Tensor],
        proposals: Sequence[Tensor],
        image_sizes: Sequence[Size],
        gt: PaddedTargets | None = None,
        want_detections: bool = True,
    ) -> tuple[Detections | None, dict[str, Tensor]]:
        """Detections (labels ``0..C-1``) when asked and, with ``gt``, the head losses."""
        losses: dict[str, Tensor] = {}
        if gt is not None:
            losses = self.loss(features, proposals, image_sizes, gt)
        detections = None
        if want_detections:
            rois = _to_rois(proposals)
            logits, deltas = self.predict(features, rois, image_sizes)
            counts = [len(p) for p in proposals]
            detections = self.postprocess(logits, deltas, rois, counts, image_sizes)
        return detections, losses

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
        targets = self.box_coder.encode(matched[is_pos], rois[is_pos, 1:])
        return rois, classes, targets

    def loss(self, features, proposals, image_sizes, gt: PaddedTargets) -> dict[str, Tensor]:
        """``classification`` (CE over sampled RoIs) and ``box_regression`` (smooth L1 of the
        true class's deltas over positives, divided by the number of sampled RoIs)."""
        rois, classes, targets = self.sample(proposals, gt)
        logits, deltas = self.predict(features, rois, image_sizes)
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

    @torch.no_grad()
    def postprocess(
        self,
        logits: Tensor,
        deltas: Tensor,
        rois: Tensor,
        counts: Sequence[int],
        image_sizes: Sequence[Size],
    ) -> Detections:
        """Softmax, per-class decoding, clip, threshold, small-box removal, NMS per class."""

        num_cls = logits.shape[-1]
        boxes = self.box_coder.decode(
            deltas.float().view(len(rois), num_cls, 4), rois[:, None, 1:].float()
        )
        scores = F.softmax(logits.float(), -1)
        out = []
        for b, s, size in zip(boxes.split(counts), scores.split(counts), image_sizes, strict=True):
            b = clip_boxes(b, size)[:, 1:].reshape(-1, 4)
            labels = torch.arange(num_cls - 1, device=s.device).repeat(len(s))
            s = s[:, 1:].reshape(-1)
            keep = torch.where(s > self.score_thresh)[0]
            b, s, labels = b[keep], s[keep], labels[keep]
            keep = remove_small_boxes(b, self.min_size)
            b, s, labels = b[keep], s[keep], labels[keep]
            keep = batched_nms(b, s, labels, self.nms_thresh)[: self.detections_per_img]
            out.append({"boxes": b[keep], "scores": s[keep], "labels": labels[keep]})
        return out


def _to_rois(boxes: Sequence[Tensor]) -> Tensor:
    """Per-image ``[K, 4]`` boxes as one ``[R, 5]`` tensor with the image index first."""
    ids = [torch.full_like(b[:, :1], i) for i, b in enumerate(boxes)]
    return torch.cat([torch.cat(ids), torch.cat(list(boxes))], dim=1)
