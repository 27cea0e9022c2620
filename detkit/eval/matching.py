"""One vectorised matching pass: detection-ground-truth pairs, their IoU, and greedy matching.

Pairs are formed between every detection and every ground truth of the same group (COCO:
image x category, confusion matrix: image). The greedy assignment of pycocotools is
sequential over the detections of a group in score order; groups are independent, so we walk
the detection *rank* (at most 100 steps) and match the rank-r detection of every group at
once, for every IoU threshold and area range at once.
"""

from __future__ import annotations

import numpy as np

COCO_MAX_IOU = 1 - 1e-10  # pycocotools caps the threshold so IoU == 1 can match at t=1


def group_pairs(det_group: np.ndarray, gt_group_sorted: np.ndarray) -> tuple[np.ndarray, ...]:
    """All (detection, gt) index pairs sharing a group; ``gt_group_sorted`` must be sorted."""
    start = np.searchsorted(gt_group_sorted, det_group, side="left")
    count = np.searchsorted(gt_group_sorted, det_group, side="right") - start
    total = int(count.sum())
    pair_det = np.repeat(np.arange(len(det_group)), count)
    first = np.cumsum(count) - count
    pair_gt = np.repeat(start - first, count) + np.arange(total)
    return pair_det, pair_gt


def coco_pair_iou(det_xywh: np.ndarray, gt_xywh: np.ndarray, crowd: np.ndarray) -> np.ndarray:
    """IoU per row pair, operation for operation as pycocotools' ``bbIou`` (float64).

    A crowd gt uses the detection's area as the union, so a detection inside a crowd region
    scores 1 however large the region.
    """
    dx, dy, dw, dh = det_xywh.T
    gx, gy, gw, gh = gt_xywh.T
    w = np.minimum(dw + dx, gw + gx) - np.maximum(dx, gx)
    h = np.minimum(dh + dy, gh + gy) - np.maximum(dy, gy)
    inter = w * h
    det_area = dw * dh
    union = np.where(crowd, det_area, det_area + gw * gh - inter)
    overlap = (w > 0) & (h > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(overlap, inter / np.where(overlap, union, 1.0), 0.0)


def voc_pair_iou(det_xyxy: np.ndarray, gt_xyxy: np.ndarray, plus_one: bool) -> np.ndarray:
    """IoU per row pair as the VOC devkit computes it (``+1`` pixel widths when asked)."""
    one = 1.0 if plus_one else 0.0
    iw = np.maximum(
        np.minimum(det_xyxy[:, 2], gt_xyxy[:, 2]) - np.maximum(det_xyxy[:, 0], gt_xyxy[:, 0]) + one,
        0.0,
    )  # noqa: E501
    ih = np.maximum(
        np.minimum(det_xyxy[:, 3], gt_xyxy[:, 3]) - np.maximum(det_xyxy[:, 1], gt_xyxy[:, 1]) + one,
        0.0,
    )  # noqa: E501
    inter = iw * ih
    det_area = (det_xyxy[:, 2] - det_xyxy[:, 0] + one) * (det_xyxy[:, 3] - det_xyxy[:, 1] + one)
    gt_area = (gt_xyxy[:, 2] - gt_xyxy[:, 0] + one) * (gt_xyxy[:, 3] - gt_xyxy[:, 1] + one)
    union = det_area + gt_area - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def greedy_match(
    pair_det: np.ndarray,
    pair_gt: np.ndarray,
    pair_iou: np.ndarray,
    det_rank: np.ndarray,
    gt_ignore: np.ndarray,
    gt_crowd: np.ndarray,
    thresholds: np.ndarray,
) -> np.ndarray:
    """pycocotools' greedy matching for every (ignore set, threshold) row at once.

    ``det_rank`` is the score rank of each detection inside its group, ``gt_ignore`` is
    ``[A, G]`` (one row per area range), ``thresholds`` is ``[T]``. Returns ``matched_gt``
    ``[A * T, D]``: the gt index each detection matched (row ``a * T + t``), or -1.

    Rules (cocoeval.evaluateImg): a detection takes the unmatched (or crowd) non-ignored gt
    with the highest IoU >= t, the last one on ties; only when there is none, the best such
    ignored gt. A matched non-crowd gt is unavailable to later detections.
    """
    n_det = len(det_rank)
    areas, n_gt = gt_ignore.shape
    limits = np.minimum(np.asarray(thresholds, np.float64), COCO_MAX_IOU)
    rows = areas * len(limits)
    matched = np.full((rows, n_det), -1, dtype=np.int64)
    keep = pair_iou >= limits.min()
    pd, pg, pi = pair_det[keep], pair_gt[keep], pair_iou[keep]
    if len(pd) == 0:
        return matched
    # Within a detection, ascending (iou, gt index): the last valid pair is pycocotools' pick.
    order = np.lexsort((pg, pi, pd, det_rank[pd]))
    pd, pg, pi = pd[order], pg[order], pi[order]
    starts = np.flatnonzero(np.r_[True, pd[1:] != pd[:-1]])
    seg_det = pd[starts]
    seg_rank = det_rank[seg_det]
    rank_bounds = np.flatnonzero(np.r_[True, seg_rank[1:] != seg_rank[:-1], True])
    row_limit = np.tile(limits, areas)[:, None]
    row_ignore = np.repeat(gt_ignore, len(limits), axis=0)
    taken = np.zeros((rows, n_gt), dtype=bool)
    seg_ends = np.r_[starts[1:], len(pd)]
    for s0, s1 in zip(rank_bounds[:-1], rank_bounds[1:], strict=True):
        p0, p1 = starts[s0], seg_ends[s1 - 1]
        g = pg[p0:p1]
        valid = (~taken[:, g] | gt_crowd[g]) & (pi[p0:p1] >= row_limit)
        ignored = row_ignore[:, g]
        position = np.arange(p0, p1)
        local = starts[s0:s1] - p0
        best = np.maximum.reduceat(np.where(valid & ~ignored, position, -1), local, axis=1)
        fallback = np.maximum.reduceat(np.where(valid & ignored, position, -1), local, axis=1)
        best = np.where(best >= 0, best, fallback)
        row, col = np.nonzero(best >= 0)
        chosen = pg[best[row, col]]
        matched[row, seg_det[s0 + col]] = chosen
        taken[row, chosen] = True
    return matched
