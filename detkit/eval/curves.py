"""PR curves, F1 and confusion matrix, from the same matching as COCO AP."""

from __future__ import annotations

import numpy as np

from detkit.eval.ap import score_curves
from detkit.eval.coco import CocoMatch
from detkit.eval.io import GroundTruth, Predictions
from detkit.eval.matching import coco_pair_iou, greedy_match, group_pairs


def class_curves(match: CocoMatch, iou_index: int = 0, area_index: int = 0) -> list[dict]:
    """Per class: precision/recall/F1 after each score level (IoU 0.5, all areas by default).

    Each item holds ``scores``, ``precision``, ``recall``, ``f1`` (descending score) and
    ``num_gt``. Detections that match crowd regions count as neither TP nor FP, as in COCO.
    """
    num_cats = match.num_gt.shape[1]
    bounds = np.searchsorted(match.det_category, np.arange(num_cats + 1))
    tp, fp = match.tp[area_index, iou_index], match.fp[area_index, iou_index]
    curves = []
    for k in range(num_cats):
        part = slice(bounds[k], bounds[k + 1])
        used = tp[part] | fp[part]
        num_gt = int(match.num_gt[area_index, k])
        curve = score_curves(tp[part][used], fp[part][used], match.det_scores[part][used], num_gt)
        curve["num_gt"] = num_gt
        curves.append(curve)
    return curves


def at_threshold(curve: dict, score_threshold: float) -> dict:
    """Precision, recall and F1 keeping the detections with score >= ``score_threshold``."""
    kept = int(np.count_nonzero(curve["scores"] >= score_threshold))
    if kept == 0:
        return {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    return {name: float(curve[name][kept - 1]) for name in ("precision", "recall", "f1")}


def best_f1(curve: dict) -> dict:
    """The score threshold with the highest F1 (the highest threshold on ties); F1 -1 and no
    threshold for a class without ground truth."""
    if curve.get("num_gt", 1) == 0:
        return {"f1": -1.0, "threshold": None, "precision": -1.0, "recall": -1.0}
    if len(curve["f1"]) == 0:
        return {"f1": 0.0, "threshold": float("nan"), "precision": 0.0, "recall": 0.0}
    i = int(np.argmax(curve["f1"]))
    return {
        "f1": float(curve["f1"][i]),
        "threshold": float(curve["scores"][i]),
        "precision": float(curve["precision"][i]),
        "recall": float(curve["recall"][i]),
    }


def confusion_matrix(
    truth: GroundTruth,
    pred: Predictions,
    iou_threshold: float = 0.5,
    score_threshold: float = 0.25,
    ignore: np.ndarray | None = None,
) -> np.ndarray:
    """``[K+1, K+1]`` counts, rows = true class, columns = predicted class, index K = background.

    Class-agnostic greedy matching per image (highest score first, best IoU >= threshold);
    matched pairs land on (true, predicted), unmatched detections on the background row,
    missed ground truth on the background column. Crowd regions absorb detections silently,
    and so does ground truth marked in ``ignore [G]`` (VOC's difficult objects), which is
    never counted as missed either.
    """
    num_cats = len(truth.category_ids)
    keep = pred.scores >= score_threshold
    order = np.flatnonzero(keep)[np.lexsort((-pred.scores[keep], pred.image[keep]))]
    det_img = pred.image[order]
    first = np.flatnonzero(np.r_[True, det_img[1:] != det_img[:-1]]) if len(order) else order
    rank = np.arange(len(order)) - np.repeat(first, np.diff(np.r_[first, len(order)]))
    gt_order = np.argsort(truth.image, kind="stable")
    crowd = truth.crowd[gt_order]
    absorbs = crowd if ignore is None else crowd | ignore[gt_order]
    pair_det, pair_gt = group_pairs(det_img, truth.image[gt_order])
    iou = coco_pair_iou(pred.boxes[order][pair_det], truth.boxes[gt_order][pair_gt], crowd[pair_gt])
    matched = greedy_match(pair_det, pair_gt, iou, rank, absorbs[None], crowd, [iou_threshold])[0]
    gt_cls, det_cls = truth.category[gt_order], pred.category[order]
    is_match = matched >= 0
    absorbed = np.zeros_like(is_match)
    absorbed[is_match] = absorbs[matched[is_match]]
    real = is_match & ~absorbed
    size = num_cats + 1
    cells = gt_cls[matched[real]] * size + det_cls[real]
    cells = np.r_[cells, num_cats * size + det_cls[~is_match]]
    found = np.zeros(len(gt_cls), bool)
    found[matched[real]] = True
    cells = np.r_[cells, gt_cls[~found & ~absorbs] * size + num_cats]
    return np.bincount(cells, minlength=size * size).reshape(size, size)
