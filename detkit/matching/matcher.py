"""Prior-to-ground-truth matchers, batched over images with padded ground truth.

Decisions equal torchvision's ``Matcher`` / ``SSDMatcher`` applied image by image, with its
codes mapped to labels: a match is 1, ``BELOW_LOW_THRESHOLD`` (-1) is 0 (negative) and
``BETWEEN_THRESHOLDS`` (-2) is -1 (ignored). Padded ground truth never matches; an image
without ground truth gets only negatives (torchvision raises there instead).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from detkit.matching.fused import (
    MatchStats,
    match_stats_chunked,
    match_stats_dense,
    stats_from_iou,
)
from detkit.structures import PaddedTargets

# Above this many IoU entries (B * M * P) match_priors avoids the dense matrix.
FUSED_MIN_ELEMENTS = 1 << 22


class MatchResult(NamedTuple):
    """Per-prior matching decisions of a batch."""

    matched_gt: Tensor  # [B, P] int64: index into M of the matched gt, 0 where unmatched
    labels: Tensor  # [B, P] int8: 1 positive, 0 negative, -1 ignore
    max_iou: Tensor  # [B, P] float32: best IoU with any real ground truth


class Matcher:
    """Two-threshold matcher (Faster R-CNN RPN: 0.7 / 0.3 with low-quality matches).

    A prior whose best IoU is ``>= high_threshold`` is positive, ``< low_threshold`` negative,
    in between ignored. With ``allow_low_quality_matches`` every prior reaching some ground
    truth's highest IoU (all ties, as torchvision) becomes positive for its own best ground
    truth, as in torchvision's ``set_low_quality_matches_``.
    """

    def __init__(
        self, high_threshold: float, low_threshold: float, allow_low_quality_matches: bool = False
    ) -> None:
        if low_threshold > high_threshold:
            raise ValueError(
                f"low_threshold ({low_threshold}) must be <= high_threshold ({high_threshold})"
            )
        self.high_threshold = high_threshold
        self.low_threshold = low_threshold
        self.allow_low_quality_matches = allow_low_quality_matches

    @property
    def needs_ties(self) -> bool:
        """Whether :meth:`decide` reads ``MatchStats.ties``."""
        return self.allow_low_quality_matches

    @property
    def argmax_from(self) -> float | None:
        """The lowest best IoU at which :meth:`decide` reads a prior's ``argmax`` (None: any).

        Only positives take their argmax: priors at ``high_threshold`` or above, and with
        low-quality matches also those tying some ground truth's best, whatever their IoU.
        """
        if self.allow_low_quality_matches or self.high_threshold <= 0:
            return None
        return self.high_threshold

    def __call__(self, iou: Tensor, gt_mask: Tensor | None = None) -> MatchResult:
        """Match ``iou [B, M, P]`` (``gt_mask [B, M]`` marks real ground truth)."""
        if gt_mask is None:
            gt_mask = torch.ones(iou.shape[:2], dtype=torch.bool, device=iou.device)
        return self.decide(stats_from_iou(iou, gt_mask, self.needs_ties), gt_mask)

    def decide(self, stats: MatchStats, gt_mask: Tensor) -> MatchResult:
        """Decisions from precomputed statistics (dense or fused)."""
        max_iou = stats.max_iou
        positive = max_iou >= self.high_threshold
        if self.allow_low_quality_matches:
            if stats.ties is None:
                raise ValueError("allow_low_quality_matches needs MatchStats.ties")
            positive |= stats.ties
        # Images without ground truth have only negatives. Masks and where, not masked
        # assignments: each of those is a nonzero and a scatter (0.4 ms of SSD300's matching).
        has_gt = gt_mask.any(dim=1, keepdim=True)
        positive &= has_gt
        ignored = (max_iou >= self.low_threshold) & ~positive & has_gt
        labels = positive.to(torch.int8) - ignored.to(torch.int8)
        matched = torch.where(positive, stats.argmax, 0)
        return MatchResult(matched, labels, max_iou)

    def __repr__(self) -> str:
        return (
            f"Matcher(high_threshold={self.high_threshold}, low_threshold={self.low_threshold},"
            f" allow_low_quality_matches={self.allow_low_quality_matches})"
        )


class SSDMatcher(Matcher):
    """SSD matching: each ground truth takes its best prior, then every prior with IoU >= t.

    Equal to torchvision's ``SSDMatcher``: the forced best-prior matches override the
    threshold ones, and when several ground truths share a best prior the one with the
    highest index wins (torchvision's sequential index assignment).
    """

    def __init__(self, threshold: float = 0.5) -> None:
        super().__init__(threshold, threshold, allow_low_quality_matches=False)

    def decide(self, stats: MatchStats, gt_mask: Tensor) -> MatchResult:
        """Decisions from precomputed statistics (dense or fused)."""
        result = super().decide(stats, gt_mask)
        batch, most = gt_mask.shape
        gt_index = torch.arange(most, device=gt_mask.device).expand(batch, most)
        forced = torch.full_like(result.matched_gt, -1)
        forced.scatter_reduce_(
            1, stats.gt_argmax, torch.where(gt_mask, gt_index, -1), reduce="amax"
        )
        is_forced = forced >= 0
        matched = torch.where(is_forced, forced, result.matched_gt)
        labels = torch.where(is_forced, 1, result.labels).to(torch.int8)
        return MatchResult(matched, labels, result.max_iou)

    def __repr__(self) -> str:
        return f"SSDMatcher(threshold={self.high_threshold})"


def match_priors(
    priors: Tensor,
    gt: PaddedTargets,
    matcher: Matcher,
    fused: bool | None = None,
) -> MatchResult:
    """Match shared priors ``[P, 4]`` against a batch's padded ground truth in one go.

    ``fused=None`` picks the fused path (chunked on CPU, a Triton kernel on CUDA) when the
    ``[B, M, P]`` IoU matrix would exceed ``FUSED_MIN_ELEMENTS`` entries; True/False force it.
    """
    batch, most = gt.mask.shape
    if fused is None:
        fused = batch * most * len(priors) > FUSED_MIN_ELEMENTS
    gt_boxes = gt.boxes.to(device=priors.device, dtype=torch.float32)
    gt_mask = gt.mask.to(priors.device)
    priors = priors.float()
    if not fused:
        stats = match_stats_dense(priors, gt_boxes, gt_mask, matcher.needs_ties)
    elif priors.is_cuda and _triton_launcher() is not None:
        stats = _triton_launcher()(priors, gt_boxes, gt_mask, matcher.needs_ties)
    else:
        stats = match_stats_chunked(
            priors, gt_boxes, gt_mask, matcher.needs_ties, argmax_from=matcher.argmax_from
        )
    return matcher.decide(stats, gt_mask)


def _triton_launcher():
    try:
        from detkit.matching.fused_kernel import fused_match_stats
    except ImportError:
        return None
    return fused_match_stats
