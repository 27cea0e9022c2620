"""Conventions shared by every part of detkit, and the containers that carry them.

Boxes
    ``xyxy`` in absolute pixels, float32. Other formats exist only at the edges: COCO ``xywh``
    in JSON files (converted with :func:`xyxy_to_xywh` / :func:`xywh_to_xyxy` below, for numpy
    arrays and tensors alike) and YOLO normalised ``cxcywh`` in YOLO label files (the YOLO
    loader's :func:`detkit.data.boxes.cxcywh_norm_to_xyxy`). :func:`detkit.ops.box_convert`
    converts tensors between any two formats, as ``torchvision.ops.box_convert`` does.
Labels
    Object classes are ``0..C-1`` and ``num_classes = C`` counts object classes only. A head
    that needs a background class adds it internally (e.g. SSD's softmax over ``C + 1``) and
    shifts it away before anything leaves the detector.
Dataset ids
    Datasets map their own ids (COCO category ids, VOC class names) to ``0..C-1`` and keep the
    inverse map (``label_to_category_id``) so predictions can be written as COCO results JSON.
Precision
    NMS and IoU run in at least float32, even under autocast: half-precision inputs are
    upcast, float64 stays float64 (the rule in :mod:`detkit.ops.nms`, torchvision's keep set).
Images
    A batch is a float tensor ``[B, 3, H, W]`` with values in ``[0, 1]``; detectors normalise
    (mean/std) themselves so exported graphs and checkpoints carry their own normalisation.
Targets
    One dict per image: ``boxes [N, 4]`` float32 xyxy in the pixels of the image tensor the
    detector sees, ``labels [N]`` int64, ``image_id`` int, ``orig_size`` ``(h, w)`` of the file
    on disk. Optional ``iscrowd``/``difficult`` ``[N]`` bool flags for evaluation.
Detector outputs
    ``forward(images, targets=None)`` returns a :class:`DetectorOutput`: ``losses`` when targets
    are given, ``detections`` when not training (or when asked), so validation loss and mAP
    come from one pass. Detections are one dict per image,
    ``{"boxes": [K, 4], "scores": [K], "labels": [K]}`` in input-image pixels.
Parts
    Matchers, samplers, box coders, prior generators, backbones and heads are passed in
    ready-made; Hydra's ``_target_`` builds the tree. No registries, no config dicts in modules.
Checkpoints
    Hold the resolved config and the state dict, never pickled modules; loaded with
    ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

Detections = list[dict[str, Tensor]]
Targets = list[dict[str, Tensor]]


@dataclass
class DetectorOutput:
    """What every detector's ``forward`` returns."""

    losses: dict[str, Tensor] = field(default_factory=dict)
    detections: Detections | None = None

    @property
    def loss(self) -> Tensor:
        """The sum of all loss terms (what the optimiser minimises)."""
        if not self.losses:
            raise ValueError("this output holds no losses: call the detector with targets")
        return torch.stack([v for v in self.losses.values()]).sum()


class PaddedTargets(NamedTuple):
    """Ground truth of a batch padded to the largest count, for batched assignment."""

    boxes: Tensor  # [B, M, 4] float32 xyxy, zeros where padded
    labels: Tensor  # [B, M] int64, -1 where padded
    mask: Tensor  # [B, M] bool, True for real boxes


def pad_targets(targets: Targets, device: torch.device | None = None) -> PaddedTargets:
    """Stack per-image ``boxes``/``labels`` into padded ``[B, M, ...]`` tensors with a mask."""
    if device is None:
        device = targets[0]["boxes"].device if targets else torch.device("cpu")
    batch = len(targets)
    most = max((len(t["boxes"]) for t in targets), default=0)
    boxes = torch.zeros(batch, most, 4, dtype=torch.float32, device=device)
    labels = torch.full((batch, most), -1, dtype=torch.int64, device=device)
    mask = torch.zeros(batch, most, dtype=torch.bool, device=device)
    for i, t in enumerate(targets):
        n = len(t["boxes"])
        boxes[i, :n] = t["boxes"].to(device=device, dtype=torch.float32)
        labels[i, :n] = t["labels"].to(device=device, dtype=torch.int64)
        mask[i, :n] = True
    return PaddedTargets(boxes, labels, mask)


def with_padding_slot(gt: PaddedTargets) -> PaddedTargets:
    """``gt`` with at least one (masked-out, never matched) slot per image.

    A batch without any box still needs ``M >= 1`` for the matchers' reductions and gathers.
    """
    if gt.boxes.shape[1] > 0:
        return gt
    batch, device = gt.boxes.shape[0], gt.boxes.device
    return PaddedTargets(
        torch.zeros(batch, 1, 4, device=device),
        torch.full((batch, 1), -1, dtype=torch.int64, device=device),
        torch.zeros(batch, 1, dtype=torch.bool, device=device),
    )


def empty_detections(device: torch.device | None = None) -> dict[str, Tensor]:
    """One image's detections with nothing found."""
    return {
        "boxes": torch.zeros(0, 4, device=device),
        "scores": torch.zeros(0, device=device),
        "labels": torch.zeros(0, dtype=torch.int64, device=device),
    }


def target_sizes(targets: Targets | None) -> Tensor | None:
    """Each target's ``size`` (h, w) as ``[B, 2]`` int64, when every target has one: the
    valid part of each image in a padded batch, which detections are clipped to."""
    if not targets or any(t.get("size") is None for t in targets):
        return None
    return torch.stack([torch.as_tensor(t["size"]).reshape(2) for t in targets]).to(torch.int64)


def xyxy_to_xywh(boxes):
    """``[..., 4]`` corners to COCO ``[x, y, w, h]``, for a numpy array or a tensor; the
    dtype stays (convert first: w, h in float64 from float32 corners are exact)."""
    out = _copy(boxes)
    out[..., 2:] -= out[..., :2]
    return out


def xywh_to_xyxy(boxes):
    """COCO ``[..., 4]`` ``[x, y, w, h]`` to corners, for a numpy array or a tensor."""
    out = _copy(boxes)
    out[..., 2:] += out[..., :2]
    return out


def _copy(boxes):
    return boxes.clone() if isinstance(boxes, Tensor) else np.array(boxes, copy=True)


def unpad_detections(
    boxes: Tensor, scores: Tensor, labels: Tensor, num_detections: Tensor
) -> Detections:
    """Turn the fixed-shape padded ``multiclass_nms`` outputs into one dict per image."""
    out = []
    for b, s, l, n in zip(boxes, scores, labels, num_detections.tolist(), strict=True):
        out.append({"boxes": b[:n], "scores": s[:n], "labels": l[:n].long()})
    return out
