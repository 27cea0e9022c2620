"""Pascal VOC AP (VOC2007 11-point and VOC2010+ area), devkit semantics, vectorised matching."""

from __future__ import annotations

import os

import numpy as np

from detkit.eval.ap import voc_ap
from detkit.eval.io import GroundTruth, Predictions, load_ground_truth, load_predictions
from detkit.eval.matching import group_pairs, voc_pair_iou
from detkit.eval.stats import class_keys


def _xyxy(xywh: np.ndarray) -> np.ndarray:
    return np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)


def voc_match(
    truth: GroundTruth,
    pred: Predictions,
    iou_threshold: float = 0.5,
    use_difficult: bool = False,
    plus_one: bool = False,
) -> dict:
    """Devkit matching for all classes at once.

    Each detection looks only at its best-overlapping gt of the same class in its image (the
    first on ties): above the threshold it is a true positive if that gt is still free, a
    false positive if already taken, and neither when the gt is difficult. Returns arrays in
    (class, descending score) order: ``category``, ``scores``, ``tp``, ``fp`` and ``num_pos``.
    """
    num_cats = len(truth.category_ids)
    difficult = truth.difficult & (not use_difficult)
    gt_groups = truth.image * num_cats + truth.category
    gt_order = np.argsort(gt_groups, kind="stable")
    det_groups = pred.image * num_cats + pred.category
    det_order = np.lexsort((-pred.scores, pred.category))
    pair_det, pair_gt = group_pairs(det_groups[det_order], gt_groups[gt_order])
    gt_xyxy = _xyxy(truth.boxes[gt_order])
    iou = voc_pair_iou(_xyxy(pred.boxes[det_order])[pair_det], gt_xyxy[pair_gt], plus_one)

    num_det = len(det_order)
    best = np.lexsort((pair_gt, -iou, pair_det))  # per detection: highest IoU, first gt
    first = best[np.r_[True, pair_det[best][1:] != pair_det[best][:-1]]] if len(best) else best
    overlap = np.full(num_det, -np.inf)
    target = np.full(num_det, -1)
    overlap[pair_det[first]] = iou[first]
    target[pair_det[first]] = pair_gt[first]
    hit = overlap > iou_threshold
    target_difficult = np.r_[difficult[gt_order], False][target]  # -1 (no gt) -> False
    on_difficult = hit & target_difficult
    candidate = hit & ~on_difficult
    tp = np.zeros(num_det, bool)
    _, first_claim = np.unique(np.where(candidate, target, -1), return_index=True)
    tp[first_claim] = True
    tp &= candidate
    fp = ~tp & ~on_difficult
    num_pos = np.bincount(truth.category[~difficult], minlength=num_cats)
    return {
        "category": pred.category[det_order],
        "scores": pred.scores[det_order],
        "tp": tp,
        "fp": fp,
        "num_pos": num_pos,
    }


def voc_from_arrays(
    truth: GroundTruth,
    pred: Predictions,
    iou_threshold: float = 0.5,
    method: str = "area",
    use_difficult: bool = False,
    plus_one: bool = False,
) -> dict:
    """VOC AP per class and their mean, from already loaded arrays."""
    if method not in ("area", "11point"):
        raise ValueError(f"method must be 'area' or '11point', got {method!r}")
    m = voc_match(truth, pred, iou_threshold, use_difficult, plus_one)
    num_cats = len(truth.category_ids)
    bounds = np.searchsorted(m["category"], np.arange(num_cats + 1))
    per_class = []
    for k in range(num_cats):
        if m["num_pos"][k] == 0:
            per_class.append(-1.0)  # no positives: AP undefined, left out of the mean
            continue
        tp = np.cumsum(m["tp"][bounds[k] : bounds[k + 1]]).astype(np.float64)
        fp = np.cumsum(m["fp"][bounds[k] : bounds[k + 1]]).astype(np.float64)
        recall = tp / float(m["num_pos"][k])
        precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
        per_class.append(voc_ap(recall, precision, method))
    valid = [ap for ap in per_class if ap > -1]
    mean = float(np.mean(valid)) if valid else -1.0
    return {"mAP": mean, "per_class": dict(zip(class_keys(truth), per_class, strict=True))}


def evaluate_voc(
    gt: str | os.PathLike | dict,
    predictions: str | os.PathLike | list,
    iou_threshold: float = 0.5,
    method: str = "area",
    use_difficult: bool = False,
    plus_one: bool = False,
) -> dict:
    """Pascal VOC mAP with the devkit's semantics.

    ``method="11point"`` is VOC2007, ``"area"`` VOC2010+. Difficult objects (the gt's
    ``difficult`` key, else ``ignore``, else ``iscrowd``) are neither positives nor errors
    unless ``use_difficult``. ``plus_one`` uses the devkit's inclusive-pixel ``+1`` widths.
    A detection counts if its IoU is strictly above ``iou_threshold``. Returns
    ``{"mAP": float, "per_class": {name: AP}}`` (-1 for classes without positives).
    """
    truth = load_ground_truth(gt)
    pred = load_predictions(predictions, truth)
    return voc_from_arrays(truth, pred, iou_threshold, method, use_difficult, plus_one)
