"""COCO box evaluation with pycocotools' exact semantics, vectorised over images x categories.

Entry point :func:`evaluate_coco`; :func:`coco_match` is the matching pass the PR curves and
the metric object reuse.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import numpy as np

from detkit.eval.ap import coco_precision
from detkit.eval.io import GroundTruth, Predictions, load_ground_truth, load_predictions
from detkit.eval.matching import coco_pair_iou, greedy_match, group_pairs
from detkit.eval.stats import stats_dict

IOU_THRESHOLDS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)
RECALL_THRESHOLDS = np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1, endpoint=True)
AREA_RANGES = np.array([[0, 1e5**2], [0, 32**2], [32**2, 96**2], [96**2, 1e5**2]], np.float64)
AREA_NAMES = ("all", "small", "medium", "large")
MAX_DETS = (1, 10, 100)


@dataclass
class CocoMatch:
    """Result of the matching pass; detections kept are the top 100 per (image, category).

    Detection arrays are in accumulation order (category, descending score, image, rank).
    """

    det_category: np.ndarray  # [D]
    det_image: np.ndarray  # [D]
    det_scores: np.ndarray  # [D]
    det_rank: np.ndarray  # [D] score rank inside its (image, category)
    tp: np.ndarray  # [A, T, D] bool
    fp: np.ndarray  # [A, T, D] bool (ignored detections are neither)
    num_gt: np.ndarray  # [A, K] non-ignored ground truth per area range and category


def _sorted_detections(gt: GroundTruth, pred: Predictions, max_det: int) -> tuple:
    """Indices of detections kept (top ``max_det`` per group by stable score order) and ranks."""
    groups = pred.image * len(gt.category_ids) + pred.category
    order = np.lexsort((-pred.scores, groups))
    sorted_groups = groups[order]
    first = np.flatnonzero(np.r_[True, sorted_groups[1:] != sorted_groups[:-1]])
    run_start = np.repeat(first, np.diff(np.r_[first, len(order)]))
    rank = np.arange(len(order)) - run_start
    keep = rank < max_det
    return order[keep], rank[keep], sorted_groups[keep]


def coco_match(
    gt: GroundTruth,
    pred: Predictions,
    iou_thresholds: np.ndarray = IOU_THRESHOLDS,
    area_ranges: np.ndarray = AREA_RANGES,
    max_det: int = MAX_DETS[-1],
    ignore: np.ndarray | None = None,
) -> CocoMatch:
    """Match all detections to ground truth for every IoU threshold and area range at once.

    ``ignore [G]`` marks more ground truth to ignore like crowd regions (detections matching
    it count as neither TP nor FP, and it is not counted as missed) but with the plain IoU:
    VOC's difficult objects for the VOC protocols' curves. COCO's AP takes None.
    """
    num_cats = len(gt.category_ids)
    gt_groups = gt.image * num_cats + gt.category
    gt_order = np.argsort(gt_groups, kind="stable")
    gt_groups = gt_groups[gt_order]
    g_box, g_area = gt.boxes[gt_order], gt.area[gt_order]
    g_crowd, g_ids = gt.crowd[gt_order], gt.ids[gt_order]
    g_cat = gt.category[gt_order]

    det_idx, rank, det_groups = _sorted_detections(gt, pred, max_det)
    d_box = pred.boxes[det_idx]
    pair_det, pair_gt = group_pairs(det_groups, gt_groups)
    iou = coco_pair_iou(d_box[pair_det], g_box[pair_gt], g_crowd[pair_gt])

    lo, hi = area_ranges[:, :1], area_ranges[:, 1:]
    gt_ignore = g_crowd[None] | (g_area[None] < lo) | (g_area[None] > hi)  # [A, G]
    if ignore is not None:
        gt_ignore |= ignore[gt_order][None]
    matched = greedy_match(pair_det, pair_gt, iou, rank, gt_ignore, g_crowd, iou_thresholds)
    areas, thresholds = len(area_ranges), len(iou_thresholds)
    matched = matched.reshape(areas, thresholds, -1)

    if (g_ids == 0).any():
        warnings.warn(
            "ground truth has an annotation with id 0: like pycocotools, detections matched "
            "to it count as unmatched (use ids from 1)",
            stacklevel=3,
        )
    is_matched = matched >= 0
    safe = np.where(is_matched, matched, 0)
    # pycocotools stores the gt *id* and tests it for truth: a match to id 0 counts as none.
    if len(g_ids) == 0:  # nothing to index: no detection can be matched
        counted = gt_ign_of_match = is_matched
    else:
        counted = is_matched & (g_ids[safe] != 0)
        gt_ign_of_match = np.take_along_axis(gt_ignore[:, None, :], safe, axis=2) & is_matched
    det_area = d_box[:, 2] * d_box[:, 3]
    det_outside = (det_area[None] < lo) | (det_area[None] > hi)  # [A, D]
    det_ignore = gt_ign_of_match | (~counted & det_outside[:, None, :])

    img = pred.image[det_idx]
    cat = pred.category[det_idx]
    scores = pred.scores[det_idx]
    acc = np.lexsort((rank, img, -scores, cat))
    num_gt = np.stack([np.bincount(g_cat[~ig], minlength=num_cats) for ig in gt_ignore])
    return CocoMatch(
        det_category=cat[acc],
        det_image=img[acc],
        det_scores=scores[acc],
        det_rank=rank[acc],
        tp=(counted & ~det_ignore)[:, :, acc],
        fp=(~counted & ~det_ignore)[:, :, acc],
        num_gt=num_gt,
    )


def coco_recall(match: CocoMatch, max_dets: tuple[int, ...] = MAX_DETS) -> np.ndarray:
    """Recall ``[T, K, A, M]`` as cocoeval.accumulate: -1 where a category has no gt."""
    areas, thresholds, _ = match.tp.shape
    num_cats = match.num_gt.shape[1]
    recall = -np.ones((thresholds, num_cats, areas, len(max_dets)))
    # Flat bin = (area, threshold, category): one bincount for every row.
    row_base = (np.arange(areas * thresholds) * num_cats).reshape(areas, thresholds, 1)
    bins = row_base + match.det_category[None, None]
    for m, max_det in enumerate(max_dets):
        hits = match.tp & (match.det_rank < max_det)[None, None]
        counts = np.bincount(bins[hits], minlength=areas * thresholds * num_cats)
        counts = counts.reshape(areas, thresholds, num_cats).transpose(1, 2, 0)
        npig = match.num_gt.T[None]  # [1, K, A]
        with np.errstate(divide="ignore", invalid="ignore"):
            recall[..., m] = np.where(npig > 0, counts / npig, -1.0)
    return recall


def _mean_valid(values: np.ndarray) -> float:
    valid = values[values > -1]
    return -1.0 if len(valid) == 0 else float(np.mean(valid))


def summarize(precision: np.ndarray, recall: np.ndarray) -> list[float]:
    """The 12 numbers of ``COCOeval.summarize()``; ``precision`` [T,R,K,A], ``recall`` [T,K,A,M].

    Slices and means are taken in pycocotools' memory order, so the sums are bit-identical.
    """
    t50 = np.where(IOU_THRESHOLDS == 0.5)[0]
    t75 = np.where(IOU_THRESHOLDS == 0.75)[0]
    ap = [
        _mean_valid(precision[:, :, :, 0]),
        _mean_valid(precision[t50][:, :, :, 0]),
        _mean_valid(precision[t75][:, :, :, 0]),
    ]
    ap += [_mean_valid(precision[:, :, :, a]) for a in (1, 2, 3)]
    ar = [_mean_valid(recall[:, :, 0, m]) for m in range(len(MAX_DETS))]
    ar += [_mean_valid(recall[:, :, a, -1]) for a in (1, 2, 3)]
    return ap + ar


def evaluate_coco(
    gt: str | os.PathLike | dict,
    predictions: str | os.PathLike | list,
    backend: str = "detkit",
) -> dict:
    """COCO box mAP, equal to pycocotools' ``COCOeval(iouType="bbox")`` to the last bit.

    ``gt`` is a COCO JSON path or dict, ``predictions`` a COCO results path or list. Returns
    ``{"stats": [12 floats in summarize() order], "AP": ..., ..., "ARl": ...,
    "per_class": {name: AP}}`` with -1 where nothing can be measured (no ground truth).
    ``backend="pycocotools"`` or ``"faster_coco_eval"`` runs that tool instead.
    """
    if backend != "detkit":
        from detkit.eval.backends import run_backend

        return run_backend(backend, gt, predictions)
    truth = load_ground_truth(gt)
    return coco_from_arrays(truth, load_predictions(predictions, truth))


def coco_from_arrays(
    truth: GroundTruth,
    pred: Predictions,
    keep_match: bool = False,
    ignore: np.ndarray | None = None,
) -> dict:
    """:func:`evaluate_coco` on loaded arrays; ``keep_match`` adds the matching pass under
    ``"match"`` and the precision array ``[T, R, K, A]`` under ``"precision"``; ``ignore``
    as in :func:`coco_match` (None for COCO's own numbers)."""
    match = coco_match(truth, pred, ignore=ignore)
    precision = coco_precision(
        match.tp, match.fp, match.det_category, match.num_gt, RECALL_THRESHOLDS
    )
    recall = coco_recall(match)
    per_class = [_mean_valid(precision[:, :, k, 0]) for k in range(len(truth.category_ids))]
    result = stats_dict(summarize(precision, recall), per_class, truth)
    if keep_match:
        result.update(match=match, precision=precision)
    return result
