"""Average precision from matched detections: COCO 101-point interpolation and VOC AP."""

from __future__ import annotations

import numpy as np

_ENVELOPE_BUDGET = 8_000_000  # padded cells per chunk of rows (64 MB of float64)


def _first_reaching(num_gt: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Smallest n >= 1 with ``n / num_gt >= t`` evaluated in float64 as numpy would.

    This is where ``searchsorted(recall, t, 'left')`` lands in pycocotools, counted in true
    positives; ceil() gives the neighbourhood, the two fix-ups make the float comparison exact.
    """
    npig = np.maximum(num_gt, 1).astype(np.float64)[..., None]
    n = np.maximum(np.ceil(thresholds * npig).astype(np.int64), 1)
    for _ in range(2):
        n -= ((n - 1 >= 1) & ((n - 1) / npig >= thresholds)).astype(np.int64)
        n += (n / npig < thresholds).astype(np.int64)
    return n


def _tp_precisions(tp: np.ndarray, fp: np.ndarray, category: np.ndarray, num_cats: int):
    """Per true positive: its row, category, index n (1-based) and precision at it."""
    tp_cum = np.cumsum(tp, axis=1)
    fp_cum = np.cumsum(fp, axis=1)
    cat_start = np.searchsorted(category, np.arange(num_cats))
    pad = np.zeros((len(tp), 1), np.int64)
    tp_base = np.concatenate([pad, tp_cum], axis=1)[:, cat_start]
    fp_base = np.concatenate([pad, fp_cum], axis=1)[:, cat_start]
    row, col = np.nonzero(tp)
    cat = category[col]
    n = tp_cum[row, col] - tp_base[row, cat]
    f = fp_cum[row, col] - fp_base[row, cat]
    n_f, f_f = n.astype(np.float64), f.astype(np.float64)
    precision = n_f / (f_f + n_f + np.spacing(1))  # same operation order as cocoeval
    return row, cat, n, precision


def coco_precision(
    tp: np.ndarray,
    fp: np.ndarray,
    category: np.ndarray,
    num_gt: np.ndarray,
    recall_thresholds: np.ndarray,
) -> np.ndarray:
    """Interpolated precision ``[T, R, K, A]`` exactly as ``COCOeval.accumulate``.

    ``tp``/``fp`` are ``[A, T, D]`` over detections sorted by (category, score desc, image,
    rank); ``num_gt`` is ``[A, K]``. The precision envelope (max over higher recall) only
    changes at true positives, so it is computed on the true-positive sequence of each
    (row, category) laid out as a padded matrix.
    """
    areas, thresholds, _ = tp.shape
    num_cats = num_gt.shape[1]
    rows = areas * thresholds
    row, cat, n, prec = _tp_precisions(
        tp.reshape(rows, -1), fp.reshape(rows, -1), category, num_cats
    )
    n_tp = np.bincount(row * num_cats + cat, minlength=rows * num_cats).reshape(rows, num_cats)
    reach = _first_reaching(num_gt, recall_thresholds)  # [A, K, R]
    reach = np.repeat(reach, thresholds, axis=0)  # [rows, K, R]
    out = np.zeros((rows, num_cats, len(recall_thresholds)))
    width = max(int(n_tp.max(initial=0)), 1)
    step = max(1, _ENVELOPE_BUDGET // (num_cats * width))
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        lo, hi = np.searchsorted(row, [r0, r1])
        env = np.zeros((r1 - r0, num_cats, width))
        env[row[lo:hi] - r0, cat[lo:hi], n[lo:hi] - 1] = prec[lo:hi]
        env = np.maximum.accumulate(env[..., ::-1], axis=-1)[..., ::-1]
        idx = reach[r0:r1]
        inside = idx <= n_tp[r0:r1, :, None]
        picked = np.take_along_axis(env, np.minimum(idx, width) - 1, axis=-1)
        out[r0:r1] = np.where(inside, picked, 0.0)
    out = out.reshape(areas, thresholds, num_cats, -1).transpose(1, 3, 2, 0)
    missing = (num_gt == 0).T[None, None]  # [1, 1, K, A]
    return np.where(missing, -1.0, out)


def voc_ap(recall: np.ndarray, precision: np.ndarray, method: str = "area") -> float:
    """Pascal VOC AP from a PR curve, exactly as the devkit's ``voc_ap``.

    ``"area"`` (VOC2010+): sum of (r_{k+1} - r_k) * envelope precision over recall changes.
    ``"11point"`` (VOC2007): mean of the envelope at recall 0, 0.1, ..., 1.
    """
    if method == "11point":
        ap = 0.0
        for t in np.arange(0.0, 1.1, 0.1):
            p = 0.0 if np.sum(recall >= t) == 0 else np.max(precision[recall >= t])
            ap = ap + p / 11.0
        return float(ap)
    if method != "area":
        raise ValueError(f"method must be 'area' or '11point', got {method!r}")
    mrec = np.concatenate(([0.0], recall, [1.0]))
    mpre = np.concatenate(([0.0], precision, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    i = np.where(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def score_curves(tp: np.ndarray, fp: np.ndarray, scores: np.ndarray, num_gt: int) -> dict:
    """Precision, recall and F1 after each detection of one class (sorted by score desc).

    Points are kept only at the last detection of each run of equal scores, so every point
    is reachable with a score threshold.
    """
    tp_cum = np.cumsum(tp).astype(np.float64)
    fp_cum = np.cumsum(fp).astype(np.float64)
    last = np.r_[scores[1:] != scores[:-1], True] if len(scores) else np.zeros(0, bool)
    precision = tp_cum / np.maximum(tp_cum + fp_cum, np.finfo(np.float64).eps)
    recall = tp_cum / num_gt if num_gt else np.zeros_like(tp_cum)
    denom = precision + recall
    f1 = np.where(denom > 0, 2 * precision * recall / np.where(denom > 0, denom, 1), 0.0)
    return {
        "scores": scores[last],
        "precision": precision[last],
        "recall": recall[last],
        "f1": f1[last],
    }
