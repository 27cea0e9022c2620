"""The SSD paper's geometric augmentations as albumentations transforms.

Albumentations has no exact match for SSD's zoom-out ("expand") or its IoU-constrained
patch sampling, so both are written here as :class:`DualTransform` subclasses that use the
transform's own random generators (seeded by ``Compose``, reseeded per data-loader worker).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np
from albumentations.augmentations.crops import functional as fcrops
from albumentations.augmentations.crops.transforms import BaseCrop
from albumentations.core.bbox_utils import denormalize_bboxes, normalize_bboxes
from albumentations.core.transforms_interface import DualTransform

SSD_MIN_IOUS = (0.1, 0.3, 0.5, 0.7, 0.9)


def _pairwise_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU ``[N, M]`` of xyxy boxes ``a [N, 4]`` and ``b [M, 4]`` (numpy, for augmentation)."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:4], b[None, :, 2:4])
    inter = np.clip(rb - lt, 0, None).prod(axis=2)
    area_a = (a[:, 2:4] - a[:, :2]).prod(axis=1)
    area_b = (b[:, 2:4] - b[:, :2]).prod(axis=1)
    return inter / np.maximum(area_a[:, None] + area_b[None] - inter, 1e-12)


_OPENCV_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.float32))


class ZoomOut(DualTransform):
    """SSD "expand": place the image at a random spot of a canvas ``ratio`` times larger
    (``ratio`` uniform in ``[1, max_scale]``) filled with ``fill`` (the dataset mean)."""

    def __init__(self, max_scale: float = 4.0, fill: Sequence[float] = (124, 116, 104), p=0.5):
        super().__init__(p=p)
        if max_scale < 1:
            raise ValueError(f"ZoomOut: max_scale must be >= 1, got {max_scale}")
        self.max_scale = float(max_scale)
        self.fill = tuple(float(v) for v in fill)

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]):
        height, width = params["shape"][:2]
        ratio = self.py_random.uniform(1.0, self.max_scale)
        out_h, out_w = int(height * ratio), int(width * ratio)
        top = self.py_random.randint(0, out_h - height)
        left = self.py_random.randint(0, out_w - width)
        return {"canvas": (out_h, out_w), "offset": (top, left)}

    def apply(self, img: np.ndarray, canvas=(0, 0), offset=(0, 0), **params) -> np.ndarray:
        channels = img.shape[2]
        if channels > len(self.fill):
            raise ValueError(
                f"ZoomOut: fill has {len(self.fill)} values for an image of {channels} channels"
            )
        # The fill as the image's dtype stores it (truncated for uint8, as numpy casts).
        fill = np.asarray(self.fill[:channels], dtype=np.float32).astype(img.dtype)
        top, left = offset
        bottom, right = canvas[0] - img.shape[0] - top, canvas[1] - img.shape[1] - left
        if channels <= 4 and img.dtype in _OPENCV_DTYPES:
            # One OpenCV call: filling a numpy canvas by broadcasting the 3 fill values walks
            # the channels innermost, 3 at a time (0.78 ms for a 400 x 380 canvas against
            # 0.011 ms here: a fifth of a digits sample's augmentation).
            value = [float(v) for v in fill]
            out = cv2.copyMakeBorder(
                np.ascontiguousarray(img),
                top,
                bottom,
                left,
                right,
                cv2.BORDER_CONSTANT,
                value=value,
            )
            return out.reshape(*canvas, channels)  # OpenCV drops a single channel's axis
        out = np.empty((*canvas, channels), dtype=img.dtype)
        out[:] = fill
        out[top : top + img.shape[0], left : left + img.shape[1]] = img
        return out

    def apply_to_bboxes(self, bboxes: np.ndarray, canvas=(0, 0), offset=(0, 0), **params):
        if not len(bboxes):
            return bboxes
        boxes = denormalize_bboxes(bboxes.copy(), params["shape"][:2])
        shift = np.array([offset[1], offset[0], offset[1], offset[0]], dtype=boxes.dtype)
        boxes[:, :4] += shift
        return normalize_bboxes(boxes, canvas)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("max_scale", "fill")


class SSDRandomCrop(BaseCrop):
    """SSD patch sampling: each call picks one option among "whole image", "any patch" and
    "patch with IoU >= t with some box" (``t`` in ``min_ious``); patches have a side scale in
    ``[min_scale, 1]`` (area ~[0.1, 1] of the image for the default 0.3) and aspect ratio in
    ``[1/max_aspect, max_aspect]``, as in the Caffe SSD sampler; boxes
    whose centre falls outside the patch are dropped, the rest clipped to it.
    """

    def __init__(
        self,
        min_ious: Sequence[float] = SSD_MIN_IOUS,
        min_scale: float = 0.3,
        max_aspect: float = 2.0,
        trials: int = 50,
        p: float = 1.0,
    ):
        super().__init__(p=p)
        self.min_ious = tuple(float(v) for v in min_ious)
        self.min_scale = float(min_scale)
        self.max_aspect = float(max_aspect)
        self.trials = int(trials)

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]):
        height, width = params["shape"][:2]
        whole = (0, 0, width, height)
        bboxes = data.get("bboxes")
        boxes = (
            denormalize_bboxes(np.asarray(bboxes), (height, width))[:, :4]
            if bboxes is not None and len(bboxes)
            else np.zeros((0, 4))
        )
        # None = whole image; -inf = any patch; otherwise the minimum IoU with some box
        options = (None, -np.inf, *self.min_ious)
        while True:
            mode = options[self.py_random.randrange(len(options))]
            if mode is None:
                return {"crop_coords": whole, "min_iou": None}
            # The sampler's trials drawn and checked at once (the first acceptable one wins,
            # as in the sequential loop): with small objects most modes fail all of them, and
            # a Python loop over the trials was most of the augmentation's time.
            patches = self._sample_patches(height, width)
            accepted = np.flatnonzero(self._acceptable(patches, boxes, mode))
            if len(accepted):
                return {"crop_coords": tuple(int(v) for v in patches[accepted[0]]), "min_iou": mode}
            if not len(boxes):
                return {"crop_coords": whole, "min_iou": None}

    def _sample_patches(self, height: int, width: int) -> np.ndarray:
        """``trials`` patches ``[T, 4]`` (x1, y1, x2, y2; integers): Caffe SSD's BatchSampler,
        side scale s and an aspect ratio limited so the patch fits."""
        rng = self.random_generator
        scale = rng.uniform(self.min_scale, 1.0, self.trials)
        low = np.maximum(1 / self.max_aspect, scale**2)
        high = np.minimum(self.max_aspect, 1 / scale**2)
        aspect = rng.uniform(low, high)
        w = np.clip((scale * np.sqrt(aspect) * width).astype(np.int64), 1, width)
        h = np.clip((scale / np.sqrt(aspect) * height).astype(np.int64), 1, height)
        # uniform integers in [0, width - w] and [0, height - h], ends included
        left = np.minimum((rng.random(self.trials) * (width - w + 1)).astype(np.int64), width - w)
        top = np.minimum((rng.random(self.trials) * (height - h + 1)).astype(np.int64), height - h)
        return np.stack((left, top, left + w, top + h), axis=1)

    @staticmethod
    def _acceptable(patches: np.ndarray, boxes: np.ndarray, min_iou: float) -> np.ndarray:
        """Per patch: some box's centre strictly inside it, and (unless ``min_iou`` is -inf)
        its IoU with some box at least ``min_iou``."""
        if not len(boxes):
            return np.ones(len(patches), dtype=bool)
        patches = patches.astype(np.float64)
        centres = (boxes[:, :2] + boxes[:, 2:4]) / 2  # [N, 2]
        inside = (
            (centres[None] > patches[:, None, :2]) & (centres[None] < patches[:, None, 2:])
        ).all(axis=2)  # [T, N]
        ok = inside.any(axis=1)
        if min_iou == -np.inf:
            return ok
        return ok & (_pairwise_iou(patches, boxes).max(axis=1) >= min_iou)

    def apply_to_bboxes(self, bboxes: np.ndarray, crop_coords=(0, 0, 0, 0), **params):
        if not len(bboxes):
            return bboxes
        boxes = denormalize_bboxes(bboxes, params["shape"][:2])
        centres = (boxes[:, :2] + boxes[:, 2:4]) / 2
        lo, hi = np.asarray(crop_coords[:2]), np.asarray(crop_coords[2:])
        inside = (centres > lo).all(axis=1) & (centres < hi).all(axis=1)
        return fcrops.crop_bboxes_by_coords(bboxes[inside], crop_coords, params["shape"][:2])

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("min_ious", "min_scale", "max_aspect", "trials")
