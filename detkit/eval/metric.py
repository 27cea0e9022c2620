"""``DetectionMetric``: accumulate detections during validation, COCO and VOC mAP at the end."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from detkit.eval.coco import coco_from_arrays
from detkit.eval.io import GroundTruth, Predictions, load_ground_truth, restrict_ground_truth
from detkit.eval.voc import voc_from_arrays
from detkit.structures import xyxy_to_xywh

_COCO_KEYS = {
    "map": "AP", "map_50": "AP50", "map_75": "AP75", "map_small": "APs", "map_medium": "APm",
    "map_large": "APl", "mar_1": "AR1", "mar_10": "AR10", "mar_100": "AR100",
    "mar_small": "ARs", "mar_medium": "ARm", "mar_large": "ARl",
}  # fmt: skip
_STATES = {
    "det_boxes": 4, "det_scores": 0, "det_labels": 0, "det_counts": 0,
    "gt_boxes": 4, "gt_labels": 0, "gt_crowd": 0, "gt_difficult": 0, "gt_counts": 0,
    "image_ids": 0,
}  # fmt: skip


def _flag(target: dict, key: str, size: int, device: torch.device) -> Tensor:
    value = target.get(key)
    if value is None:
        return torch.zeros(size, dtype=torch.bool, device=device)
    return torch.as_tensor(value, device=device).reshape(size).bool()


class DetectionMetric(Metric):
    """COCO (pycocotools-exact) and VOC mAP over a validation epoch.

    ``update(detections, targets)`` takes the detector's list of per-image dicts
    (``boxes`` xyxy, ``scores``, ``labels``) and the matching targets (``boxes``, ``labels``,
    ``image_id``, optional ``iscrowd``/``difficult``); boxes are evaluated in the coordinates
    given and COCO size ranges use box areas. States are concatenated across DDP processes
    and every ``image_id`` counts once (DistributedSampler repeats images to even out
    shards).

    ``ground_truth`` (a COCO dict or JSON path; or later :meth:`set_ground_truth`) makes the
    metric score against that file instead of the targets' boxes: restricted to the images
    seen, with the file's boxes, ``area`` and ``iscrowd``/``ignore`` flags, as pycocotools
    scores the same detections on it. Labels ``0..C-1`` then index its category ids sorted
    ascending (or ``category_ids``); targets only give ``image_id``.

    ``compute()`` returns floats: ``map``, ``map_50``, ``map_75``, ``map_small``,
    ``map_medium``, ``map_large``, ``mar_1``, ``mar_10``, ``mar_100``, ``mar_small``,
    ``mar_medium``, ``mar_large``, ``voc_map_50`` (area) and ``voc07_map_50`` (11-point);
    per-class AP is then in ``per_class`` and the whole result in ``last_result``.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(
        self,
        num_classes: int | None = None,
        class_names: list[str] | None = None,
        ground_truth: dict | str | os.PathLike | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if class_names is not None and num_classes is not None and len(class_names) != num_classes:
            raise ValueError(f"class_names has {len(class_names)} names, num_classes={num_classes}")
        self.num_classes = (
            num_classes
            if num_classes is not None
            else (len(class_names) if class_names is not None else None)
        )
        self.class_names = list(class_names) if class_names is not None else None
        for name in _STATES:
            self.add_state(name, default=[], dist_reduce_fx="cat")
        self.per_class: dict = {}
        self.last_result: dict = {}
        self.ground_truth: GroundTruth | None = None
        self._label_category: np.ndarray | None = None  # label -> index in category_ids
        if ground_truth is not None:
            self.set_ground_truth(ground_truth)

    def set_ground_truth(
        self,
        ground_truth: dict | str | os.PathLike | None,
        category_ids: list[int] | None = None,
    ) -> None:
        """Score against this COCO ground truth (dict or path) from now on; None: the targets.

        ``category_ids[label]`` is the file's category id of each label (a dataset's
        ``label_to_category_id``); by default labels index the file's ids sorted ascending.
        """
        if ground_truth is None:
            self.ground_truth, self._label_category = None, None
            return
        truth = load_ground_truth(ground_truth)
        ids = truth.category_ids if category_ids is None else np.asarray(category_ids, np.int64)
        if self.num_classes is not None and len(ids) != self.num_classes:
            raise ValueError(
                f"the ground truth's categories give {len(ids)} labels but the metric has "
                f"num_classes={self.num_classes}"
            )
        missing = np.setdiff1d(ids, truth.category_ids)
        if len(missing) or len(np.unique(ids)) != len(ids):
            raise ValueError(
                f"category_ids {ids.tolist()} are not distinct ids of the ground truth's "
                f"categories {truth.category_ids.tolist()}"
            )
        self.ground_truth = truth
        self._label_category = np.searchsorted(truth.category_ids, ids)

    def update(self, detections: list[dict[str, Tensor]], targets: list[dict[str, Tensor]]) -> None:
        """Add one batch: per-image detection dicts and the corresponding target dicts."""
        if len(detections) != len(targets):
            raise ValueError(f"{len(detections)} detection dicts but {len(targets)} targets")
        for det, tgt in zip(detections, targets, strict=True):
            if "image_id" not in tgt:
                raise ValueError("every target needs an 'image_id' (images are deduplicated by it)")
            boxes = det["boxes"].detach().reshape(-1, 4).float()
            gt_boxes = tgt["boxes"].detach().reshape(-1, 4).float()
            dev, n_gt = boxes.device, len(gt_boxes)
            self.det_boxes.append(boxes)
            self.det_scores.append(det["scores"].detach().reshape(-1).float())
            self.det_labels.append(det["labels"].detach().reshape(-1).long())
            self.det_counts.append(torch.tensor([len(boxes)], device=dev))
            self.gt_boxes.append(gt_boxes.to(dev))
            self.gt_labels.append(tgt["labels"].detach().reshape(-1).long().to(dev))
            crowd = _flag(tgt, "iscrowd", n_gt, dev)
            difficult = _flag(tgt, "difficult", n_gt, dev) if "difficult" in tgt else crowd
            self.gt_crowd.append(crowd)
            self.gt_difficult.append(difficult)
            self.gt_counts.append(torch.tensor([n_gt], device=dev))
            self.image_ids.append(torch.as_tensor(tgt["image_id"], device=dev).reshape(1).long())

    def _arrays(self) -> tuple[GroundTruth, Predictions]:
        state = {name: dim_zero_cat(getattr(self, name)).cpu().numpy() for name in _STATES}
        image_ids = state["image_ids"].astype(np.int64)
        first = np.zeros(len(image_ids), bool)
        first[np.unique(image_ids, return_index=True)[1]] = True  # first copy of each image
        det_keep = np.repeat(first, state["det_counts"].astype(np.int64))
        gt_keep = np.repeat(first, state["gt_counts"].astype(np.int64))
        det_img = np.repeat(image_ids, state["det_counts"].astype(np.int64))[det_keep]
        known = np.unique(image_ids)
        det_labels = state["det_labels"].astype(np.int64)
        if self.ground_truth is not None:
            truth, labels = self._file_truth(known), det_labels
            num_classes = len(self._label_category)
        else:
            labels = np.r_[det_labels, state["gt_labels"]].astype(np.int64)
            num_classes = self.num_classes or (int(labels.max()) + 1 if len(labels) else 1)
            truth = self._target_truth(state, known, gt_keep, num_classes)
        if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(
                f"labels must be in 0..{num_classes - 1}, got {labels.min()}..{labels.max()}"
            )
        if self.ground_truth is not None:  # labels to the file's category order
            det_labels = self._label_category[det_labels]
        pred = Predictions(
            image=np.searchsorted(known, det_img),
            category=det_labels[det_keep],
            boxes=xyxy_to_xywh(state["det_boxes"].reshape(-1, 4)[det_keep].astype(np.float64)),
            scores=state["det_scores"].astype(np.float64)[det_keep],
        )
        if not np.isfinite(pred.boxes).all() or not np.isfinite(pred.scores).all():
            raise ValueError("detections contain NaN/inf boxes or scores")
        return truth, pred

    def _file_truth(self, image_ids: np.ndarray) -> GroundTruth:
        """The ground-truth file on the images seen."""
        unknown = np.setdiff1d(image_ids, self.ground_truth.image_ids)
        if len(unknown):
            raise ValueError(
                f"{len(unknown)} validated image(s) are not in the metric's ground truth, "
                f"e.g. image_id {unknown[:5].tolist()}"
            )
        return restrict_ground_truth(self.ground_truth, image_ids)

    def _target_truth(
        self, state: dict, image_ids: np.ndarray, gt_keep: np.ndarray, num_classes: int
    ) -> GroundTruth:
        """Ground truth from the targets' boxes (areas are the boxes' w*h)."""
        gt_img = np.repeat(state["image_ids"], state["gt_counts"].astype(np.int64))[gt_keep]
        gt_xywh = xyxy_to_xywh(state["gt_boxes"].reshape(-1, 4)[gt_keep].astype(np.float64))
        return GroundTruth(
            image_ids=image_ids,
            category_ids=np.arange(num_classes),
            category_names=self.class_names or [str(k) for k in range(num_classes)],
            image=np.searchsorted(image_ids, gt_img.astype(np.int64)),
            category=state["gt_labels"].astype(np.int64)[gt_keep],
            boxes=gt_xywh,
            area=gt_xywh[:, 2] * gt_xywh[:, 3],
            crowd=state["gt_crowd"].astype(bool)[gt_keep],
            difficult=state["gt_difficult"].astype(bool)[gt_keep],
            ids=np.arange(1, int(gt_keep.sum()) + 1),
        )

    def compute(self) -> dict[str, float]:
        """COCO and VOC metrics over every image seen (by all processes), each once."""
        if len(self.image_ids) == 0:  # a list before sync, a tensor after
            raise ValueError("DetectionMetric.compute() called before any update()")
        truth, pred = self._arrays()
        coco = coco_from_arrays(truth, pred)
        voc12 = voc_from_arrays(truth, pred, 0.5, "area")
        voc07 = voc_from_arrays(truth, pred, 0.5, "11point")
        result = {key: coco[name] for key, name in _COCO_KEYS.items()}
        result["voc_map_50"] = voc12["mAP"]
        result["voc07_map_50"] = voc07["mAP"]
        self.per_class = coco["per_class"]
        self.last_result = {**coco, "voc12": voc12, "voc07": voc07}
        return result
