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

# Priors per chunk are chosen so that a chunk's IoU block holds about this many elements.
CHUNK_ELEMENTS = 1 << 18


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


class _ChunkIoU:
    """IoU ``[B, M, C]`` of a chunk of priors, computed for the real ground truth only.

    Padding is often half of ``B * M`` (images have few boxes, the batch pads to the most),
    so the real rows are computed together and copied into a buffer whose padded rows stay
    -inf; the values are those of :func:`_masked_iou` bit for bit.
    """

    def __init__(self, priors: Tensor, gt_boxes: Tensor, gt_mask: Tensor, chunk_size: int):
        self.priors, self.chunk_size = priors, chunk_size
        self.shape = gt_mask.shape
        self.rows = gt_mask.reshape(-1).nonzero().squeeze(1)
        self.real_boxes = gt_boxes.reshape(-1, 4)[self.rows]
        size = min(chunk_size, len(priors))
        self.buffer = torch.full((gt_mask.numel(), size), float("-inf"), device=priors.device)

    def __call__(self, start: int) -> Tensor:
        from detkit.ops import box_iou

        chunk = self.priors[start : start + self.chunk_size]
        out = self.buffer[:, : len(chunk)]
        out.index_copy_(0, self.rows, box_iou(self.real_boxes, chunk))
        return out.view(*self.shape, len(chunk))


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


def match_stats_chunked(
    priors: Tensor,
    gt_boxes: Tensor,
    gt_mask: Tensor,
    need_ties: bool = False,
    chunk_size: int | None = None,
) -> MatchStats:
    """Match statistics computed over chunks of priors; never holds the ``[B, M, P]`` matrix.

    Equal to :func:`match_stats_dense` (same IoU arithmetic, same first-index tie rule). Ties
    need the final per-gt maxima, so they take a second pass over the chunks.
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
    gt_max = torch.full((batch, most), float("-inf"), device=device)
    gt_arg = torch.zeros(batch, most, dtype=torch.int64, device=device)
    chunk_iou = _ChunkIoU(priors, gt_boxes, gt_mask, chunk_size)
    for start in range(0, num, chunk_size):
        iou = chunk_iou(start)
        torch.max(iou, dim=1, out=(max_iou[:, start : start + chunk_size],
                                   argmax[:, start : start + chunk_size]))  # fmt: skip
        chunk_max, chunk_arg = iou.max(dim=2)
        # Strictly greater: an earlier chunk keeps ties, giving torch.max's first index.
        better = chunk_max > gt_max
        gt_max = torch.where(better, chunk_max, gt_max)
        gt_arg = torch.where(better, chunk_arg + start, gt_arg)
    ties = None
    if need_ties:
        ties = torch.empty(batch, num, dtype=torch.bool, device=device)
        for start in range(0, num, chunk_size):
            hit = (chunk_iou(start) == gt_max[:, :, None]) & gt_mask[:, :, None]
            ties[:, start : start + chunk_size] = hit.any(dim=1)
    has_gt = gt_mask.any(dim=1, keepdim=True)
    max_iou = torch.where(has_gt, max_iou, torch.zeros_like(max_iou))
    return MatchStats(max_iou, argmax, gt_max, gt_arg, ties)
