"""Match statistics of priors against padded ground truth, dense or without the IoU matrix.

A matcher's decisions need only a few reductions of the ``[B, M, P]`` IoU matrix: for each
prior its best ground truth (max and first argmax), for each ground truth its best prior, and,
for Faster R-CNN's low-quality matches, which priors tie with some ground truth's best IoU.
:func:`match_stats_chunked` computes them over chunks of priors so the peak memory is one chunk
(a second pass finds the ties), and the Triton kernel in
:mod:`detkit.matching.fused_kernel` does the same on CUDA without any matrix at all.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

# Priors per chunk are chosen so that a chunk's IoU block holds about this many elements
# (2 MiB). Measured with bench_matching, three runs each: SSD300's targets for 32 images
# 2.46x / 2.64x / 2.86x torchvision's with 1 / 2 / 4 MiB chunks, and the 200k x 1k RPN case
# peaking at 12 / 40-47 / 84 MB; 2 MiB keeps that peak under a tenth of the IoU matrix's.
CHUNK_ELEMENTS = 1 << 19


class MatchStats(NamedTuple):
    """Reductions of the IoU matrix between ``P`` priors and ``M`` padded ground truths.

    Padded ground truth (``gt_mask`` False) never counts. Without real ground truth a prior's
    ``max_iou`` is 0 and its ``argmax`` 0.
    """

    max_iou: Tensor  # [B, P] float32: best IoU of each prior over real ground truth
    argmax: Tensor  # [B, P] int64: first ground truth reaching it
    gt_max_iou: Tensor  # [B, M] float32: best IoU of each ground truth over priors (-inf pads)
    gt_argmax: Tensor  # [B, M] int64: first prior reaching it
    ties: Tensor | None  # [B, P] bool: prior reaches some real gt's gt_max_iou (if asked)


def _check_inputs(priors: Tensor, gt_boxes: Tensor, gt_mask: Tensor) -> None:
    if priors.dim() != 2 or priors.shape[-1] != 4:
        raise ValueError(f"priors must have shape [P, 4], got {tuple(priors.shape)}")
    if gt_boxes.dim() != 3 or gt_boxes.shape[-1] != 4:
        raise ValueError(f"gt_boxes must have shape [B, M, 4], got {tuple(gt_boxes.shape)}")
    if gt_mask.shape != gt_boxes.shape[:2]:
        raise ValueError(
            f"gt_mask shape {tuple(gt_mask.shape)} does not match gt_boxes {tuple(gt_boxes.shape)}"
        )


def _masked_iou(priors: Tensor, gt_boxes: Tensor, gt_mask: Tensor) -> Tensor:
    """IoU ``[B, M, P]`` with padded rows set to -inf (priors are shared by the batch)."""
    from detkit.ops import box_iou

    batch, most = gt_mask.shape
    iou = box_iou(gt_boxes.reshape(batch * most, 4), priors).view(batch, most, -1)
    return iou.masked_fill_(~gt_mask[:, :, None], float("-inf"))


def _distinct_intervals(lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    """Distinct ``(lo, hi)`` pairs ``[U, 2]`` and each input's index into them ``[P]``.

    Pairs are compared by their bits (two float32 as one int64): one 1-D sort, several times
    faster than ``torch.unique(dim=0)``; -0.0 and 0.0 stay apart, which only costs a row.
    """
    key = torch.stack((lo, hi), dim=1).contiguous().view(torch.int64).squeeze(1)
    distinct, index = torch.unique(key, return_inverse=True)
    return distinct.view(torch.float32).view(-1, 2), index


# Each priors tensor's distinct intervals, while it lives and is not modified: a detector
# passes the same cached reference every step, and the two sorts that find them took 0.46 ms
# of SSD300's 5 ms matching (batch 32).
_GRID_INTERVALS = WeakIdKeyDictionary()


def _grid_intervals(priors: Tensor) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """The priors' distinct x and y intervals (see :func:`_distinct_intervals`), cached."""
    # Inference tensors have no version counter; tensor subclasses (fake, functional) are
    # graph capture's, which must not keep real tensors alive.
    cacheable = type(priors) is Tensor and not priors.is_inference()
    cached = _GRID_INTERVALS.get(priors) if cacheable else None
    if cached is not None and cached[0] == priors._version:
        return cached[1]
    axes = (
        _distinct_intervals(priors[:, 0], priors[:, 2]),
        _distinct_intervals(priors[:, 1], priors[:, 3]),
    )
    if cacheable:
        _GRID_INTERVALS[priors] = (priors._version, axes)
    return axes


def _overlap(boxes: Tensor, intervals: Tensor, axis: int) -> Tensor:
    """Clamped overlap ``[N, U]`` of each box with each interval along one axis (0 x, 1 y)."""
    lo, hi = boxes[:, axis, None], boxes[:, axis + 2, None]
    return (torch.minimum(hi, intervals[:, 1]) - torch.maximum(lo, intervals[:, 0])).clamp_(min=0)


class _SharedAxisIoU:
    """IoU of fixed boxes against priors that repeat their x and y intervals, as on a grid.

    A grid's default boxes share their x interval down each column and their y interval along
    each row (SSD300's 8732 have 372 distinct of each), so the clamped overlap along each axis
    is computed once for the distinct intervals and gathered per prior: 6 passes over the
    ``[N, P]`` block instead of :func:`detkit.ops.box_iou`'s 12. Every value comes from the
    same float operations on the same operands, so the bits equal ``box_iou``'s.
    """

    def __init__(self, boxes: Tensor, priors: Tensor, x_axis: tuple, y_axis: tuple) -> None:
        (x_intervals, self.x_index), (y_intervals, self.y_index) = x_axis, y_axis
        self.width = _overlap(boxes, x_intervals, 0)
        self.height = _overlap(boxes, y_intervals, 1)
        self.box_area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        self.prior_area = (priors[:, 2] - priors[:, 0]) * (priors[:, 3] - priors[:, 1])

    @classmethod
    def if_worth_it(cls, boxes: Tensor, priors: Tensor) -> _SharedAxisIoU | None:
        """The shared-axis IoU when the priors repeat their intervals enough to pay for the
        gathers (at most half as many distinct intervals as priors) and the per-axis overlaps
        stay within a few chunks' memory; else None."""
        # float32 only: the intervals are compared as two float32 bits in one int64. CPU only:
        # the gathers were measured to pay there (CUDA and other devices keep box_iou).
        on_cpu = priors.device.type == "cpu"
        if len(priors) < 64 or not on_cpu or {priors.dtype, boxes.dtype} != {torch.float32}:
            return None
        x_axis, y_axis = _grid_intervals(priors)
        distinct = len(x_axis[0]) + len(y_axis[0])
        if distinct > len(priors) // 2 or len(boxes) * distinct > 4 * CHUNK_ELEMENTS:
            return None
        return cls(boxes, priors, x_axis, y_axis)

    def __call__(self, start: int, stop: int) -> Tensor:
        """IoU ``[N, stop - start]`` of the boxes with priors ``start:stop``."""
        # gather with a broadcast index: ~2.5x faster than index_select along dim 1 on CPU.
        rows = len(self.box_area)
        inter = torch.gather(self.height, 1, self.y_index[None, start:stop].expand(rows, -1))
        inter.mul_(torch.gather(self.width, 1, self.x_index[None, start:stop].expand(rows, -1)))
        union = self.box_area[:, None] + self.prior_area[None, start:stop]
        return inter.div_(union.sub_(inter))


class _ChunkIoU:
    """IoU of a chunk of priors, computed for the real ground truth only.

    Padding is often half of ``B * M`` (images have few boxes, the batch pads to the most),
    so the real rows are computed together and copied into a buffer whose padded rows stay
    -inf; the values are those of :func:`_masked_iou` bit for bit. Priors on a grid take the
    shared-axis IoU (:class:`_SharedAxisIoU`), the others :func:`detkit.ops.box_iou`.
    """

    def __init__(self, priors: Tensor, gt_boxes: Tensor, gt_mask: Tensor, chunk_size: int):
        self.priors, self.chunk_size = priors, chunk_size
        self.shape = gt_mask.shape
        self.rows = gt_mask.reshape(-1).nonzero().squeeze(1)
        self.real_boxes = gt_boxes.reshape(-1, 4)[self.rows]
        size = min(chunk_size, len(priors))
        self.buffer = torch.full((gt_mask.numel(), size), float("-inf"), device=priors.device)
        self.shared_axes = _SharedAxisIoU.if_worth_it(self.real_boxes, priors)

    def __call__(self, start: int) -> tuple[Tensor, Tensor]:
        """The chunk's IoU: the real rows ``[R, C]`` and the padded ``[B, M, C]`` view."""
        from detkit.ops import box_iou

        chunk = self.priors[start : start + self.chunk_size]
        if self.shared_axes is not None:
            real_iou = self.shared_axes(start, start + len(chunk))
        else:
            # float32 as the dense path (stats_from_iou) reduces, also for float64 boxes
            real_iou = box_iou(self.real_boxes, chunk).float()
        out = self.buffer[:, : len(chunk)]
        out.index_copy_(0, self.rows, real_iou)
        return real_iou, out.view(*self.shape, len(chunk))


def stats_from_iou(iou: Tensor, gt_mask: Tensor, need_ties: bool = False) -> MatchStats:
    """Match statistics from a dense quality matrix ``iou [B, M, P]`` (any float values)."""
    if iou.dim() != 3 or gt_mask.shape != iou.shape[:2]:
        raise ValueError(
            f"iou must be [B, M, P] and gt_mask [B, M]; got {tuple(iou.shape)} and "
            f"{tuple(gt_mask.shape)}"
        )
    batch, most, num = iou.shape
    iou = iou.float().masked_fill(~gt_mask[:, :, None], float("-inf"))
    if most == 0:
        zeros = torch.zeros(batch, num, device=iou.device)
        empty = torch.zeros(batch, 0, device=iou.device)
        ties = torch.zeros(batch, num, dtype=torch.bool, device=iou.device) if need_ties else None
        return MatchStats(zeros, zeros.long(), empty, empty.long(), ties)
    max_iou, argmax = iou.max(dim=1)
    gt_max, gt_arg = iou.max(dim=2)
    ties = None
    if need_ties:
        ties = ((iou == gt_max[:, :, None]) & gt_mask[:, :, None]).any(dim=1)
    has_gt = gt_mask.any(dim=1, keepdim=True)
    max_iou = torch.where(has_gt, max_iou, torch.zeros_like(max_iou))
    return MatchStats(max_iou, argmax, gt_max, gt_arg, ties)


def match_stats_dense(
    priors: Tensor, gt_boxes: Tensor, gt_mask: Tensor, need_ties: bool = False
) -> MatchStats:
    """Match statistics through the full ``[B, M, P]`` IoU matrix (reference path)."""
    _check_inputs(priors, gt_boxes, gt_mask)
    if gt_mask.shape[1] == 0:
        return stats_from_iou(gt_boxes.new_zeros(len(gt_mask), 0, len(priors)), gt_mask, need_ties)
    return stats_from_iou(_masked_iou(priors, gt_boxes, gt_mask), gt_mask, need_ties)


def _best_over_gt(iou: Tensor, argmax_from: float, max_out: Tensor, arg_out: Tensor) -> None:
    """Each prior's best IoU over the ground-truth axis of ``iou [B, M, C]`` into ``max_out``,
    and its first argmax into ``arg_out`` where that IoU is ``>= argmax_from`` (left as is
    elsewhere).

    On CPU ``amax`` over the middle axis is vectorised along the priors while ``max(dim=1)``
    walks each prior's column with its index on its own: at SSD300's shapes (``[32, 20, 819]``
    chunks) that was 0.21 ms against 0.04 ms per chunk, half the matcher's time. Matchers read
    the argmax only for positives, a few per cent of the priors, which are gathered.
    """
    values = torch.amax(iou, dim=1)
    max_out.copy_(values)
    img, prior = (values >= argmax_from).nonzero(as_tuple=True)
    if len(img):
        # [n, M]: the argmax of an innermost axis is the first maximum's index
        arg_out[img, prior] = iou[img, :, prior].argmax(dim=1)


def match_stats_chunked(
    priors: Tensor,
    gt_boxes: Tensor,
    gt_mask: Tensor,
    need_ties: bool = False,
    chunk_size: int | None = None,
    argmax_from: float | None = None,
) -> MatchStats:
    """Match statistics computed over chunks of priors; never holds the ``[B, M, P]`` matrix.

    Equal to :func:`match_stats_dense` (same IoU arithmetic, same first-index tie rule). Ties
    need the final per-gt maxima, so they take a second pass over the chunks. With
    ``argmax_from`` a prior's ``argmax`` is computed only where its ``max_iou`` reaches that
    value and is 0 elsewhere (see :attr:`~detkit.matching.Matcher.argmax_from`).
    """
    _check_inputs(priors, gt_boxes, gt_mask)
    batch, most = gt_mask.shape
    num = len(priors)
    if most == 0 or num == 0:
        return match_stats_dense(priors, gt_boxes, gt_mask, need_ties)
    if chunk_size is None:
        chunk_size = max(256, CHUNK_ELEMENTS // max(1, batch * most))
    device = priors.device
    max_iou = torch.empty(batch, num, device=device)
    argmax = torch.empty(batch, num, dtype=torch.int64, device=device)
    chunk_iou = _ChunkIoU(priors, gt_boxes, gt_mask, chunk_size)
    # Each ground truth's best prior, over the real rows only (padded ones stay -inf and 0).
    real_max = torch.full((len(chunk_iou.rows),), float("-inf"), device=device)
    real_arg = torch.zeros(len(chunk_iou.rows), dtype=torch.int64, device=device)
    if argmax_from is not None:
        argmax.zero_()
    for start in range(0, num, chunk_size):
        real_iou, iou = chunk_iou(start)
        stop = start + real_iou.shape[1]
        if argmax_from is None:
            torch.max(iou, dim=1, out=(max_iou[:, start:stop], argmax[:, start:stop]))
        else:
            _best_over_gt(iou, argmax_from, max_iou[:, start:stop], argmax[:, start:stop])
        chunk_max, chunk_arg = real_iou.max(dim=1)
        # Strictly greater: an earlier chunk keeps ties, giving torch.max's first index.
        better = chunk_max > real_max
        real_max = torch.where(better, chunk_max, real_max)
        real_arg = torch.where(better, chunk_arg + start, real_arg)
    gt_max = torch.full((batch * most,), float("-inf"), device=device)
    gt_max = gt_max.index_copy_(0, chunk_iou.rows, real_max).view(batch, most)
    gt_arg = torch.zeros(batch * most, dtype=torch.int64, device=device)
    gt_arg = gt_arg.index_copy_(0, chunk_iou.rows, real_arg).view(batch, most)
    ties = None
    if need_ties:
        ties = torch.empty(batch, num, dtype=torch.bool, device=device)
        for start in range(0, num, chunk_size):
            hit = (chunk_iou(start)[1] == gt_max[:, :, None]) & gt_mask[:, :, None]
            ties[:, start : start + chunk_size] = hit.any(dim=1)
    has_gt = gt_mask.any(dim=1, keepdim=True)
    max_iou = torch.where(has_gt, max_iou, torch.zeros_like(max_iou))
    return MatchStats(max_iou, argmax, gt_max, gt_arg, ties)
