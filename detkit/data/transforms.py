"""Augmentation recipes as albumentations pipelines, built from Hydra configs.

Each builder returns a :class:`DetectionTransform`: called by a dataset with a ``uint8
[H, W, 3]`` image, ``xyxy`` pixel boxes and one id per box, it returns the float32 ``[3, H, W]``
tensor in [0, 1] (no mean/std: detectors normalise themselves), the surviving boxes and their
ids (so labels and flags follow boxes through crops, drops and mosaics).

Eval pipelines are a pure rescale: predictions map back to the file's pixels with
:func:`detkit.data.boxes.boxes_to_original` using the target's ``size`` and ``orig_size``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.core.transforms_interface import DualTransform
from omegaconf import DictConfig, ListConfig, OmegaConf

from detkit.data.ssd_augment import SSD_MIN_IOUS, SSDRandomCrop, ZoomOut

IMAGENET_MEAN_255 = (124, 116, 104)  # ImageNet mean in 0..255, SSD's zoom-out fill
# Steps that change an image's geometry beyond a resize; closing the augmentation leaves them
# out (with the mosaic). Albumentations' own crops are not listed: a user's pipeline keeps them.
STRONG_AUGMENTATIONS = (ZoomOut, SSDRandomCrop)


def _plain(value: Any) -> Any:
    """Hydra hands lists as ListConfig; albumentations' validators want plain tuples."""
    if isinstance(value, ListConfig | DictConfig):
        value = OmegaConf.to_container(value, resolve=True)
    return tuple(value) if isinstance(value, list) else value


def _hw(size: int | Sequence[int]) -> tuple[int, int]:
    size = _plain(size)
    if isinstance(size, int):
        return size, size
    if isinstance(size, tuple) and len(size) == 2:
        return int(size[0]), int(size[1])
    raise ValueError(f"transform size must be an int or [height, width], got {size!r}")


class DetectionTransform:
    """An albumentations pipeline wrapped for detection samples.

    ``mosaic`` (optional) is an ``A.Mosaic`` applied with probability ``mosaic_p`` before the
    other transforms; when it fires the dataset supplies 3 extra raw samples
    (:meth:`num_extra_samples`).

    :meth:`close_augmentation` switches the strong augmentations off (the mosaic and the steps
    of :data:`STRONG_AUGMENTATIONS`: zoom-out and the IoU crop), keeping the photometric
    jitter, the flip and the resize: the final epochs of a run train on images like the ones
    it is evaluated on (Ultralytics' ``close_mosaic``; see
    :class:`~detkit.data.DetectionDataModule`'s ``close_augmentation_epochs``).

    Boxes are clipped to the image and those under ``min_box_size`` pixels a side dropped
    after every step (albumentations' default), or only after the last one with
    ``check_each_step=False``: cheaper, and the same boxes for steps that do not need clipped
    ones (translations, centre-keeping crops, flips, resizes), but the minimum size is then
    taken in output pixels.
    """

    def __init__(
        self,
        transforms: Sequence[A.BasicTransform],
        mosaic: A.Mosaic | None = None,
        mosaic_p: float = 0.0,
        min_box_size: float = 1.0,
        check_each_step: bool = True,
    ):
        self.min_box_size = float(min_box_size)
        self.check_each_step = bool(check_each_step)
        self.mosaic_p = float(mosaic_p) if mosaic is not None else 0.0
        transforms = list(transforms)
        self.pipeline = self._compose(transforms)
        self.mosaic_pipeline = self._compose([mosaic, *transforms]) if mosaic else None
        plain = [t for t in transforms if not isinstance(t, STRONG_AUGMENTATIONS)]
        self.closed_pipeline = self._compose(plain) if len(plain) < len(transforms) else None
        self.closed = False
        self._rng = np.random.default_rng()

    def _compose(self, transforms: list) -> A.Compose:
        params = A.BboxParams(
            format="pascal_voc",
            label_fields=["box_ids"],
            clip=True,
            filter_invalid_bboxes=True,
            min_width=self.min_box_size,
            min_height=self.min_box_size,
            check_each_transform=self.check_each_step,
        )
        return A.Compose(transforms, bbox_params=params)

    def set_random_seed(self, seed: int) -> None:
        """Reseed every random choice (called once per data-loader worker)."""
        self._rng = np.random.default_rng(seed)
        # Only when in use (a pipeline's seeding costs ~60 us a sample), and first: the
        # pipelines share their steps, and a step keeps the generator of the last pipeline
        # seeded, so the open pipelines draw as they did before closing existed.
        if self.closed and self.closed_pipeline is not None:
            self.closed_pipeline.set_random_seed(seed + 2)
        self.pipeline.set_random_seed(seed)
        if self.mosaic_pipeline is not None:
            self.mosaic_pipeline.set_random_seed(seed + 1)

    def close_augmentation(self, closed: bool = True) -> None:
        """Leave out (``closed``) or put back the mosaic and the strong steps."""
        self.closed = bool(closed)

    def num_extra_samples(self) -> int:
        """How many extra raw samples the next call wants (3 when a mosaic is drawn)."""
        if self.closed:
            return 0
        if self.mosaic_pipeline is not None and self._rng.random() < self.mosaic_p:
            return 3
        return 0

    def __call__(
        self,
        image: np.ndarray,
        boxes: np.ndarray,
        box_ids: np.ndarray,
        extra: Sequence[dict[str, Any]] = (),
    ) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
        data = {
            "image": np.ascontiguousarray(image),
            "bboxes": np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
            "box_ids": np.asarray(box_ids, dtype=np.int64),
        }
        pipeline = self.pipeline
        if self.closed and self.closed_pipeline is not None:
            pipeline = self.closed_pipeline
        elif extra and self.mosaic_pipeline is not None:
            pipeline = self.mosaic_pipeline
            data["mosaic_metadata"] = [
                {
                    "image": np.ascontiguousarray(e["image"]),
                    "bboxes": np.asarray(e["boxes"], dtype=np.float32).reshape(-1, 4),
                    "box_ids": np.asarray(e["box_ids"], dtype=np.int64),
                }
                for e in extra
            ]
        out = pipeline(**data)
        tensor = torch.from_numpy(np.ascontiguousarray(out["image"].transpose(2, 0, 1)))
        tensor = tensor.float().div_(255.0)
        out_boxes = np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4)
        return tensor, out_boxes, np.asarray(out["box_ids"], dtype=np.int64).reshape(-1)

    def __repr__(self) -> str:
        if self.closed:  # what runs: no mosaic, no strong steps
            pipeline = self.pipeline if self.closed_pipeline is None else self.closed_pipeline
            return f"DetectionTransform(closed, pipeline={pipeline!r})"
        return f"DetectionTransform(mosaic_p={self.mosaic_p}, pipeline={self.pipeline!r})"


def eval_resize(size: int | Sequence[int] = 300) -> DetectionTransform:
    """Deterministic plain resize to ``size`` (int or [h, w]): the eval pipeline."""
    height, width = _hw(size)
    return DetectionTransform([A.Resize(height, width, interpolation=cv2.INTER_LINEAR)])


def ssd_train(
    size: int | Sequence[int] = 300,
    mean: Sequence[float] = IMAGENET_MEAN_255,
    zoom_out_p: float = 0.5,
    max_zoom: float = 4.0,
    min_ious: Sequence[float] = SSD_MIN_IOUS,
    flip_p: float = 0.5,
    photometric_p: float = 0.5,
    crop_p: float = 1.0,
    crop_min_scale: float = 0.3,
) -> DetectionTransform:
    """SSD paper recipe: photometric distortion, zoom-out filled with ``mean`` (0..255),
    IoU-constrained random crop, horizontal flip, resize to ``size``.

    ``crop_p``/``crop_min_scale`` soften the crop for short schedules (the paper: 1.0/0.3);
    ``flip_p=0`` is for data whose classes are not mirror-symmetric, such as digits. A step
    whose probability is 0 is left out of the pipeline (the others draw from their own
    generators, so they are unchanged): albumentations would still check and convert every
    box after it, which costs as much as a cheap transform."""
    height, width = _hw(size)
    steps = [
        # torchvision's SSD photometric distortion ranges, each applied half the time
        A.ColorJitter(
            brightness=0.125, contrast=0.5, saturation=0.5, hue=0.05, p=float(photometric_p)
        ),
        ZoomOut(max_scale=float(max_zoom), fill=_plain(mean), p=float(zoom_out_p)),
        SSDRandomCrop(min_ious=_plain(min_ious), min_scale=float(crop_min_scale), p=float(crop_p)),
        A.HorizontalFlip(p=float(flip_p)),
    ]
    # Boxes are clipped and size-filtered once, after the resize, not after every step (a fifth
    # of a digits sample's time). No step here needs clipped boxes: zoom-out translates, the
    # crop keeps boxes by their centre and shifts them, flip and resize act on normalised
    # boxes, so clipping at the end gives the same boxes; only the minimum size is now taken in
    # pixels of the image the model sees.
    return DetectionTransform(
        [*(t for t in steps if t.p > 0), A.Resize(height, width, interpolation=cv2.INTER_LINEAR)],
        check_each_step=False,
    )


def ssd_eval(size: int | Sequence[int] = 300) -> DetectionTransform:
    """SSD eval: plain resize to ``size``."""
    return eval_resize(size)


def yolo_train(
    size: int = 416,
    mosaic_p: float = 0.5,
    hsv_gains: Sequence[float] = (0.015, 0.7, 0.4),
    flip_p: float = 0.5,
    fill: int = 114,
) -> DetectionTransform:
    """YOLO recipe: 2x2 mosaic (``mosaic_p``), letterbox to ``size`` x ``size`` (grey
    ``fill``), HSV jitter with Ultralytics' (hue, saturation, value) gains, horizontal flip."""
    hue, sat, val = (float(g) for g in _plain(hsv_gains))
    mosaic = A.Mosaic(
        grid_yx=(2, 2), target_size=(size, size), cell_shape=(size, size), fill=fill, p=1.0
    )
    return DetectionTransform(
        [
            *letterbox(size, fill),
            A.ColorJitter(brightness=val, contrast=0.0, saturation=sat, hue=hue, p=1.0),
            A.HorizontalFlip(p=float(flip_p)),
        ],
        mosaic=mosaic,
        mosaic_p=mosaic_p,
    )


def letterbox(size: int, fill: int = 114) -> list[A.BasicTransform]:
    """Resize the longer side to ``size`` and pad the rest (centred) with ``fill``."""
    return [
        A.LongestMaxSize(max_size=int(size)),
        A.PadIfNeeded(
            int(size), int(size), position="center", border_mode=cv2.BORDER_CONSTANT, fill=fill
        ),
    ]


def yolo_eval(size: int = 416) -> DetectionTransform:
    """YOLO eval: plain resize to ``size`` x ``size`` (so boxes map back by scaling)."""
    return eval_resize(size)


def rcnn_train(min_size: int = 600, max_size: int | None = None, flip_p: float = 0.5):
    """Faster R-CNN recipe: shorter side to ``min_size`` with the longer side at most
    ``max_size`` (scale = min(min_size/short, max_size/long)), horizontal flip.
    ``max_size=None`` keeps the papers' 5:3 ratio (600 -> 1000, 800 -> 1333)."""
    return DetectionTransform([*_rcnn_resize(min_size, max_size), A.HorizontalFlip(p=flip_p)])


def rcnn_eval(min_size: int = 600, max_size: int | None = None) -> DetectionTransform:
    """Faster R-CNN eval: the same deterministic rescale, no flip."""
    return DetectionTransform(_rcnn_resize(min_size, max_size))


def _rcnn_resize(min_size: int, max_size: int | None) -> list[A.BasicTransform]:
    if max_size is None:
        max_size = round(int(min_size) * 5 / 3)
    return [RescaleMinMax(int(min_size), int(max_size))]


class RescaleMinMax(DualTransform):
    """Rescale by ``min(min_size / short side, max_size / long side)`` (torchvision's
    GeneralizedRCNNTransform rule), up or down. Boxes are normalised inside albumentations,
    so a pure rescale leaves them unchanged."""

    def __init__(self, min_size: int = 600, max_size: int = 1000, p: float = 1.0):
        super().__init__(p=p)
        self.min_size, self.max_size = int(min_size), int(max_size)

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]):
        height, width = params["shape"][:2]
        scale = min(self.min_size / min(height, width), self.max_size / max(height, width))
        return {"out_hw": (max(1, round(height * scale)), max(1, round(width * scale)))}

    def apply(self, img: np.ndarray, out_hw=(1, 1), **params) -> np.ndarray:
        return cv2.resize(img, (out_hw[1], out_hw[0]), interpolation=cv2.INTER_LINEAR)

    def apply_to_bboxes(self, bboxes: np.ndarray, **params) -> np.ndarray:
        return bboxes

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("min_size", "max_size")
