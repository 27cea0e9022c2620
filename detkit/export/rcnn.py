"""Faster R-CNN export wrapper: RPN, proposal NMS, RoI pooling and the box head in one graph,
batched over a dynamic number of images.

The eager model loops over images (proposals of data-dependent length per image). Here both
NMS stages are :func:`detkit.ops.multiclass_nms` calls over the whole batch with padded
fixed-shape outputs:

- proposals: each pyramid level is a "class" (the RPN's per-level NMS), anchors that are too
  small or below the RPN score threshold get score -1, ``post_nms_top_n`` padded proposals
  per image come out with a validity mask;
- detections: the class-specific boxes of every proposal are candidates of their own class
  (scores of other classes -1), so one ``NonMaxSuppression`` runs per (image, class).

Every RoI of the padded ``[B * K, 5]`` list goes through the box head (padded ones are zero
boxes whose scores are masked), which keeps the graph free of data-dependent shapes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detkit.export.wrappers import ExportWrapper
from detkit.ops import clip_boxes, multiclass_nms


class FasterRCNNExport(ExportWrapper):
    """``images [B, 3, H, W] -> detections`` for a :class:`detkit.models.FasterRCNN`."""

    family = "faster_rcnn"

    def __init__(self, model: nn.Module, image_size: tuple[int, int], nms: bool = True) -> None:
        super().__init__(model, image_size, nms)
        features = self.dummy_features(lambda x: self._features(x))
        anchors, counts = model.rpn.anchors(self.image_size, features)
        self.register_buffer("anchors", anchors.clone())
        self.level_counts = [int(c) for c in counts]
        self.pool_scales = _pool_scales(model.roi_heads.box_pooler, features, self.image_size)

    def nms_settings(self) -> dict:
        rpn, heads = self.model.rpn, self.model.roi_heads
        return {
            "rpn_pre_nms_top_n": rpn.pre_nms_top_n["test"],
            "rpn_post_nms_top_n": rpn.post_nms_top_n["test"],
            "rpn_iou_threshold": rpn.nms_thresh,
            "score_threshold": heads.score_thresh,
            "iou_threshold": heads.nms_thresh,
            "max_detections": heads.detections_per_img,
        }

    def _features(self, images: Tensor) -> list[Tensor]:
        m = self.model
        features = m.backbone(m.normalize(images))
        return [features] if isinstance(features, Tensor) else list(features)

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        features = self._features(images)
        proposals, valid = self.propose(features)
        batch, per_image = proposals.shape[:2]
        image_ids = torch.arange(batch, device=images.device).to(proposals.dtype)
        image_ids = image_ids[:, None, None].expand(batch, per_image, 1)
        rois = torch.cat([image_ids, proposals], dim=2).reshape(-1, 5)
        logits, deltas = self.model.roi_heads.box_predictor(
            self.model.roi_heads.box_head(self.pool(features, rois))
        )
        return self.detect(logits, deltas, rois, valid)

    def propose(self, features: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Padded proposals ``[B, post_nms_top_n, 4]`` and their validity mask."""
        rpn = self.model.rpn
        objectness, deltas = rpn.head(features)
        top_idx, level_of, offset = [], [], 0
        for level, count in enumerate(self.level_counts):
            k = min(rpn.pre_nms_top_n["test"], count)  # static: the image size is fixed
            top_idx.append(objectness[:, offset : offset + count].topk(k, dim=1).indices + offset)
            level_of += [level] * k
            offset += count
        idx = torch.cat(top_idx, 1)
        scores = objectness.gather(1, idx).sigmoid()
        chosen = deltas.gather(1, idx.unsqueeze(-1).expand(-1, -1, 4))
        boxes = clip_boxes(rpn.box_coder.decode(chosen.float(), self.anchors[idx]), self.image_size)
        usable = _large_enough(boxes, rpn.min_size) & (scores >= rpn.score_thresh)
        levels = torch.tensor(level_of, device=boxes.device)
        one_level = levels[:, None] == torch.arange(len(self.level_counts), device=boxes.device)
        by_level = torch.where(one_level & usable[..., None], scores[..., None], -1.0)
        proposals, _, _, count = multiclass_nms(
            boxes, by_level, -0.5, rpn.nms_thresh, rpn.post_nms_top_n["test"]
        )
        slots = torch.arange(proposals.shape[1], device=boxes.device)
        return proposals, slots[None, :] < count[:, None]

    def pool(self, features: list[Tensor], rois: Tensor) -> Tensor:
        """The pooler's RoIAlign/RoIPool; with several maps, every RoI is pooled from every
        map and the FPN level rule picks one (no data-dependent indexing)."""
        pooler = self.model.roi_heads.box_pooler
        maps = features if pooler.levels is None else [features[i] for i in pooler.levels]
        if len(maps) == 1:
            return pooler._pool(maps[0], rois, self.pool_scales[0])
        level = _fpn_levels(pooler, rois, self.pool_scales)
        out = None
        for i, (feature, scale) in enumerate(zip(maps, self.pool_scales, strict=True)):
            pooled = pooler._pool(feature, rois, scale)
            pooled = torch.where((level == i)[:, None, None, None], pooled, 0.0)
            out = pooled if out is None else out + pooled
        return out

    def detect(self, logits: Tensor, deltas: Tensor, rois: Tensor, valid: Tensor):
        """Per-class decoding, clipping, score and size filters, then per-class NMS."""
        heads = self.model.roi_heads
        batch, per_image = valid.shape
        num_cls = logits.shape[-1]  # C + 1, background first
        boxes = heads.box_coder.decode(
            deltas.float().view(-1, num_cls, 4), rois[:, None, 1:].float()
        )
        boxes = clip_boxes(boxes, self.image_size)[:, 1:].reshape(batch, per_image, -1, 4)
        scores = F.softmax(logits.float(), -1)[:, 1:].reshape(batch, per_image, -1)
        keep = valid[..., None] & (scores > heads.score_thresh)
        keep = keep & _large_enough(boxes, heads.min_size)
        if not self.nms:
            return boxes, torch.where(valid[..., None], scores, 0.0)
        classes = scores.shape[-1]
        own_class = torch.eye(classes, dtype=torch.bool, device=scores.device)
        # Each (proposal, class) box is a candidate of its class only.
        sparse = torch.where(own_class & keep[..., None], scores[..., None], -1.0)
        return multiclass_nms(
            boxes.reshape(batch, -1, 4),
            sparse.reshape(batch, -1, classes),
            score_threshold=heads.score_thresh,
            iou_threshold=heads.nms_thresh,
            max_detections=heads.detections_per_img,
        )


def _large_enough(boxes: Tensor, min_size: float) -> Tensor:
    """``remove_small_boxes`` as a mask (width and height both ``>= min_size``)."""
    return ((boxes[..., 2] - boxes[..., 0]) >= min_size) & (
        (boxes[..., 3] - boxes[..., 1]) >= min_size
    )


def _pool_scales(pooler: nn.Module, features: list[Tensor], image_size) -> list[float]:
    """Map scales as the pooler infers them: powers of two from the image height."""
    maps = features if pooler.levels is None else [features[i] for i in pooler.levels]
    return [2.0 ** round(math.log2(m.shape[-2] / image_size[0])) for m in maps]


def _fpn_levels(pooler: nn.Module, rois: Tensor, scales: list[float]) -> Tensor:
    """FPN eq. 1 with the pooler's canonical scale/level, as :class:`RoIPooler` maps RoIs."""
    k_min, k_max = -math.log2(scales[0]), -math.log2(scales[-1])
    size = torch.sqrt((rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2]))
    level = torch.floor(
        pooler.canonical_level + torch.log2(size / pooler.canonical_scale) + 1e-6
    ).clamp(min=int(k_min), max=int(k_max))
    return level.to(torch.int64) - int(k_min)
