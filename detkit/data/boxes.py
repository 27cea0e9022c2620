"""Small numpy box helpers for the dataset edges (file formats and sanitising).

Kept local to the data package so loading never depends on compiled ops; the tensors the
datasets return follow the conventions in :mod:`detkit.structures`.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from detkit import structures


def xywh_to_xyxy(boxes) -> np.ndarray:
    """COCO ``[x, y, w, h]`` (any array-like) to float32 ``[N, 4]`` corners."""
    return structures.xywh_to_xyxy(np.asarray(boxes, dtype=np.float32).reshape(-1, 4))


def xyxy_to_xywh(boxes) -> np.ndarray:
    """Corners (any array-like) to float32 COCO ``[N, 4]`` ``[x, y, w, h]``."""
    return structures.xyxy_to_xywh(np.asarray(boxes, dtype=np.float32).reshape(-1, 4))


def cxcywh_norm_to_xyxy(boxes: np.ndarray, width: float, height: float) -> np.ndarray:
    """YOLO normalised ``[cx, cy, w, h]`` to absolute ``xyxy`` pixels."""
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    scale = np.array([width, height, width, height], dtype=np.float32)
    centre, size = boxes[:, :2], boxes[:, 2:]
    return np.concatenate([centre - size / 2, centre + size / 2], axis=1) * scale


def sanitize_boxes(boxes: np.ndarray, width: float, height: float) -> tuple[np.ndarray, dict]:
    """Clip boxes to the image and find the ones left without area.

    Returns ``(clipped_boxes, info)`` where ``info`` has the boolean ``keep`` mask and the
    counts ``clipped`` (changed by clipping) and ``dropped`` (zero-area, inverted, non-finite
    or wholly outside the image).
    """
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    finite = np.isfinite(boxes).all(axis=1)
    safe = np.where(finite[:, None], boxes, 0.0)
    limits = np.array([width, height, width, height], dtype=np.float32)
    clipped = np.clip(safe, 0.0, limits)
    keep = finite & (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    changed = keep & (np.abs(clipped - safe) > 1e-3).any(axis=1)
    return clipped, {"keep": keep, "clipped": int(changed.sum()), "dropped": int((~keep).sum())}


def boxes_to_original(boxes: Tensor, size: Tensor, orig_size: Tensor) -> Tensor:
    """Map boxes from a resized image (``size`` = (h, w) before padding) back to the file's
    pixels (``orig_size`` = (h, w)). Valid for the eval transforms, which are a plain resize."""
    size = torch.as_tensor(size, dtype=torch.float32, device=boxes.device)
    orig = torch.as_tensor(orig_size, dtype=torch.float32, device=boxes.device)
    scale_y, scale_x = (orig / size).unbind()
    factors = torch.stack([scale_x, scale_y, scale_x, scale_y])
    return boxes * factors.to(boxes.dtype)
