"""How far two runs' detections are apart: the same model in two runtimes (eager and ONNX
Runtime), or two implementations of one algorithm.

Detections are compared after matching (same label, smallest box + score difference first)
because another runtime may order equal scores differently. A detection left unmatched counts
as a disagreement unless its score is within the score tolerance of where the two runs cut
their lists (the score threshold, or the K-th score of a full list): there a rounding
difference can legitimately decide which of two near-equal boxes survives.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from detkit.structures import Detections


@dataclass
class Comparison:
    """How far two runs' detections are apart over a set of images."""

    max_box_diff: float = 0.0  # pixels, over matched detections
    max_score_diff: float = 0.0
    matched: int = 0
    unmatched: int = 0  # disagreements (detections without a partner, not borderline)
    borderline: int = 0  # unmatched at a cut-off, tolerated
    images: int = 0
    raw: bool = False  # raw outputs compared element-wise (no detections to match)

    def merge(self, other: Comparison) -> Comparison:
        return Comparison(
            max(self.max_box_diff, other.max_box_diff),
            max(self.max_score_diff, other.max_score_diff),
            self.matched + other.matched,
            self.unmatched + other.unmatched,
            self.borderline + other.borderline,
            self.images + other.images,
            self.raw or other.raw,
        )

    def ok(self, tolerance: float) -> bool:
        """Every detection matched, and boxes (pixels) and scores within ``tolerance``."""
        return (
            self.unmatched == 0
            and self.max_box_diff <= tolerance
            and self.max_score_diff <= tolerance
        )

    def summary(self) -> str:
        if self.raw:
            return (
                f"{self.images} images, raw outputs compared element-wise: largest box "
                f"difference {self.max_box_diff:.3g} px, largest score difference "
                f"{self.max_score_diff:.3g}"
            )
        return (
            f"{self.images} images, {self.matched} detections matched, "
            f"{self.unmatched} unmatched ({self.borderline} borderline tolerated); "
            f"largest box difference {self.max_box_diff:.3g} px, "
            f"largest score difference {self.max_score_diff:.3g}"
        )


def compare_detections(
    expected: Detections,
    got: Detections,
    score_tolerance: float = 1e-3,
    score_threshold: float | None = None,
    max_detections: int | None = None,
) -> Comparison:
    """Match ``got`` to ``expected`` per image (labels must agree) and measure differences.

    A detection found by one run only is tolerated ("borderline") when its score is within
    ``score_tolerance`` of ``score_threshold`` or of the last score of a list that holds
    ``max_detections`` (where the lists are cut).
    """
    if len(expected) != len(got):
        raise ValueError(f"compare_detections: {len(expected)} vs {len(got)} images")
    total = Comparison()
    for want, have in zip(expected, got, strict=True):
        cut_scores = [] if score_threshold is None else [float(score_threshold)]
        for run in (want, have):
            if max_detections is not None and len(run["scores"]) >= max_detections > 0:
                cut_scores.append(float(run["scores"].min()))
        total = total.merge(_compare_one(want, have, score_tolerance, cut_scores))
    return total


def _greedy_pairs(cost: Tensor) -> tuple[list[int], list[int]]:
    """Pairs by increasing cost, each row and column used once (cost >= 1e9: never)."""
    order = torch.argsort(cost.flatten(), stable=True).tolist()
    used_r, used_c, rows, cols = set(), set(), [], []
    width = cost.shape[1]
    flat = cost.flatten()
    for k in order:
        if flat[k] >= 1e9:
            break
        r, c = divmod(k, width)
        if r not in used_r and c not in used_c:
            used_r.add(r)
            used_c.add(c)
            rows.append(r)
            cols.append(c)
    return rows, cols


def _compare_one(want: dict, have: dict, tol: float, cut_scores: list[float]) -> Comparison:
    wb, ws, wl = (want[k].detach().float().cpu() for k in ("boxes", "scores", "labels"))
    hb, hs, hl = (have[k].detach().float().cpu() for k in ("boxes", "scores", "labels"))
    result = Comparison(images=1)
    rows: list[int] = []
    cols: list[int] = []
    if len(wb) and len(hb):
        box_diff = (wb[:, None, :] - hb[None, :, :]).abs().amax(-1)
        score_diff = (ws[:, None] - hs[None, :]).abs()
        same_label = wl[:, None] == hl[None, :]
        cost = torch.where(same_label, box_diff + score_diff, torch.full_like(box_diff, 1e9))
        rows, cols = _greedy_pairs(cost)
        result.matched = len(rows)
        if rows:
            result.max_box_diff = float(box_diff[rows, cols].max())
            result.max_score_diff = float(score_diff[rows, cols].max())
    lone = [float(ws[j]) for j in sorted(set(range(len(wb))) - set(rows))]
    lone += [float(hs[j]) for j in sorted(set(range(len(hb))) - set(cols))]
    for score in lone:
        if any(abs(score - c) <= tol for c in cut_scores):
            result.borderline += 1
        else:
            result.unmatched += 1
    return result
