"""The SSD paper's geometric augmentations as albumentations transforms.

Albumentations has no exact match for SSD's zoom-out ("expand") or its IoU-constrained
patch sampling, so both are written here as :class:`DualTransform` subclasses that use the
transform's own random generators (seeded by ``Compose``, reseeded per data-loader worker).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from albumentations.augmentations.crops import functional as fcrops
from albumentations.augmentations.crops.transforms import BaseCrop
from albumentations.core.bbox_utils import denormalize_bboxes, normalize_bboxes
from albumentations.core.transforms_interface import DualTransform

SSD_MIN_IOUS = (0.1, 0.3, 0.5, 0.7, 0.9)


def _iou_one_to_many(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    lt = np.maximum(box[:2], boxes[:, :2])
    rb = np.minimum(box[2:], boxes[:, 2:4])
    inter = np.clip(rb - lt, 0, None).prod(axis=1)
    area_a = np.prod(box[2:] - box[:2])
    area_b = np.prod(boxes[:, 2:4] - boxes[:, :2], axis=1)
    return inter / np.maximum(area_a + area_b - inter, 1e-12)


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
        out = np.empty((*canvas, img.shape[2]), dtype=img.dtype)
        out[:] = np.asarray(self.fill[: img.shape[2]], dtype=np.float32).astype(img.dtype)
        top, left = offset
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
            for _ in range(self.trials):
                patch = self._sample_patch(height, width)
                if self._acceptable(patch, boxes, mode):
                    return {"crop_coords": patch, "min_iou": mode}
            if not len(boxes):
                return {"crop_coords": whole, "min_iou": None}

    def _sample_patch(self, height: int, width: int) -> tuple[int, int, int, int]:
        # Caffe SSD's BatchSampler: side scale s, aspect a limited so the patch fits
        scale = self.py_random.uniform(self.min_scale, 1.0)
        low = max(1 / self.max_aspect, scale**2)
        high = min(self.max_aspect, 1 / scale**2)
        aspect = self.py_random.uniform(low, high)
        w = min(max(int(scale * np.sqrt(aspect) * width), 1), width)
        h = min(max(int(scale / np.sqrt(aspect) * height), 1), height)
        left = self.py_random.randint(0, width - w)
        top = self.py_random.randint(0, height - h)
        return (left, top, left + w, top + h)

    @staticmethod
    def _acceptable(patch: tuple, boxes: np.ndarray, min_iou: float) -> bool:
        if not len(boxes):
            return True
        patch_arr = np.asarray(patch, dtype=np.float64)
        centres = (boxes[:, :2] + boxes[:, 2:4]) / 2
        inside = (centres > patch_arr[:2]).all(axis=1) & (centres < patch_arr[2:]).all(axis=1)
        if not inside.any():
            return False
        return min_iou == -np.inf or _iou_one_to_many(patch_arr, boxes).max() >= min_iou

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
