"""Triton kernels for fused prior matching: match statistics without the IoU matrix (the
matching layer's own kernel; the box ops' kernels live in :mod:`detkit.ops.kernels`).

One program handles ``BLOCK_P`` priors of one image and walks the image's ground truth in
blocks of ``BLOCK_M``, keeping the running best IoU / first argmax per prior in registers.
Per-gt maxima over all priors need a cross-program reduction; instead of float atomics (no
deterministic argmax) each program writes its block's per-gt best to a small
``[B, M, P / BLOCK_P]`` buffer that torch reduces afterwards. Ties with the per-gt maxima
(Faster R-CNN low-quality matches) take a second kernel once those maxima are known.
The IoU arithmetic is the one of ``torchvision.ops.box_iou`` (gt first) so the results equal
:func:`detkit.matching.fused.match_stats_chunked` exactly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from detkit.matching.fused import MatchStats, match_stats_dense

__all__ = ["fused_match_stats"]

BLOCK_P = 128
BLOCK_M = 16


@triton.jit
def _load_boxes(ptr, offs, valid):
    x1 = tl.load(ptr + offs * 4 + 0, mask=valid, other=0.0)
    y1 = tl.load(ptr + offs * 4 + 1, mask=valid, other=0.0)
    # Out-of-range lanes get a unit box so their (discarded) IoU is not 0/0.
    x2 = tl.load(ptr + offs * 4 + 2, mask=valid, other=1.0)
    y2 = tl.load(ptr + offs * 4 + 3, mask=valid, other=1.0)
    return x1, y1, x2, y2


@triton.jit
def _iou_tile(gt_ptr, mask_ptr, b, m0, M, px1, py1, px2, py2, parea, BLOCK_M: tl.constexpr):
    """IoU ``[BLOCK_M, BLOCK_P]`` of gt block ``m0`` of image ``b``; padded rows are -inf."""
    offs_m = m0 + tl.arange(0, BLOCK_M)
    mvalid = offs_m < M
    gx1, gy1, gx2, gy2 = _load_boxes(gt_ptr, b * M + offs_m, mvalid)
    real = (tl.load(mask_ptr + b * M + offs_m, mask=mvalid, other=0) != 0) & mvalid
    garea = (gx2 - gx1) * (gy2 - gy1)
    iw = tl.minimum(gx2[:, None], px2[None, :]) - tl.maximum(gx1[:, None], px1[None, :])
    ih = tl.minimum(gy2[:, None], py2[None, :]) - tl.maximum(gy1[:, None], py1[None, :])
    inter = tl.maximum(iw, 0.0) * tl.maximum(ih, 0.0)
    iou = inter / (garea[:, None] + parea[None, :] - inter)
    return tl.where(real[:, None], iou, float("-inf")), offs_m, mvalid, real


@triton.jit
def _stats_kernel(
    priors_ptr, gt_ptr, mask_ptr, max_ptr, arg_ptr, blk_max_ptr, blk_arg_ptr,
    P, M, NB, BLOCK_P: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    pb = tl.program_id(1)
    offs_p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    pvalid = offs_p < P
    px1, py1, px2, py2 = _load_boxes(priors_ptr, offs_p, pvalid)
    parea = (px2 - px1) * (py2 - py1)
    run_max = tl.full([BLOCK_P], float("-inf"), tl.float32)
    run_arg = tl.zeros([BLOCK_P], tl.int32)
    for m0 in range(0, M, BLOCK_M):
        iou, offs_m, mvalid, real = _iou_tile(
            gt_ptr, mask_ptr, b, m0, M, px1, py1, px2, py2, parea, BLOCK_M
        )
        tile_max = tl.max(iou, axis=0)
        tile_arg = tl.argmax(iou, axis=0, tie_break_left=True).to(tl.int32) + m0
        # Strictly greater keeps the earlier gt on ties: torch.max's first index.
        better = tile_max > run_max
        run_arg = tl.where(better, tile_arg, run_arg)
        run_max = tl.where(better, tile_max, run_max)
        iou_p = tl.where(pvalid[None, :], iou, float("-inf"))
        g_max = tl.max(iou_p, axis=1)
        g_arg = tl.argmax(iou_p, axis=1, tie_break_left=True).to(tl.int32) + pb * BLOCK_P
        blk = (b * M + offs_m) * NB + pb
        tl.store(blk_max_ptr + blk, g_max, mask=mvalid)
        tl.store(blk_arg_ptr + blk, g_arg, mask=mvalid)
    tl.store(max_ptr + b * P + offs_p, run_max, mask=pvalid)
    tl.store(arg_ptr + b * P + offs_p, run_arg, mask=pvalid)


@triton.jit
def _ties_kernel(
    priors_ptr, gt_ptr, mask_ptr, gt_max_ptr, ties_ptr,
    P, M, BLOCK_P: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    pb = tl.program_id(1)
    offs_p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    pvalid = offs_p < P
    px1, py1, px2, py2 = _load_boxes(priors_ptr, offs_p, pvalid)
    parea = (px2 - px1) * (py2 - py1)
    hits = tl.zeros([BLOCK_P], tl.int32)
    for m0 in range(0, M, BLOCK_M):
        iou, offs_m, mvalid, real = _iou_tile(
            gt_ptr, mask_ptr, b, m0, M, px1, py1, px2, py2, parea, BLOCK_M
        )
        g_max = tl.load(gt_max_ptr + b * M + offs_m, mask=mvalid, other=float("-inf"))
        hit = (iou == g_max[:, None]) & real[:, None]
        hits = tl.maximum(hits, tl.max(hit.to(tl.int32), axis=0))
    tl.store(ties_ptr + b * P + offs_p, hits.to(tl.int8), mask=pvalid)


def fused_match_stats(
    priors: Tensor, gt_boxes: Tensor, gt_mask: Tensor, need_ties: bool = False
) -> MatchStats:
    """Triton version of :func:`detkit.matching.fused.match_stats_chunked` (same signature).

    ``priors [P, 4]`` shared by the batch, ``gt_boxes [B, M, 4]``, ``gt_mask [B, M]``.
    """
    batch, most = gt_mask.shape
    num = len(priors)
    if most == 0 or num == 0 or batch == 0:
        return match_stats_dense(priors, gt_boxes, gt_mask, need_ties)
    device = priors.device
    priors = priors.float().contiguous()
    gt_boxes = gt_boxes.float().contiguous()
    mask_i8 = gt_mask.to(torch.int8).contiguous()
    blocks = triton.cdiv(num, BLOCK_P)
    max_iou = torch.empty(batch, num, device=device)
    argmax = torch.empty(batch, num, dtype=torch.int32, device=device)
    blk_max = torch.empty(batch, most, blocks, device=device)
    blk_arg = torch.empty(batch, most, blocks, dtype=torch.int32, device=device)
    grid = (batch, blocks)
    _stats_kernel[grid](
        priors, gt_boxes, mask_i8, max_iou, argmax, blk_max, blk_arg,
        num, most, blocks, BLOCK_P=BLOCK_P, BLOCK_M=BLOCK_M,
    )  # fmt: skip
    gt_max = blk_max.max(dim=2).values
    first_block = (blk_max == gt_max[:, :, None]).to(torch.int8).argmax(dim=2, keepdim=True)
    gt_arg = blk_arg.gather(2, first_block).squeeze(2).long()
    ties = None
    if need_ties:
        ties_i8 = torch.empty(batch, num, dtype=torch.int8, device=device)
        _ties_kernel[grid](
            priors, gt_boxes, mask_i8, gt_max.contiguous(), ties_i8,
            num, most, BLOCK_P=BLOCK_P, BLOCK_M=BLOCK_M,
        )  # fmt: skip
        ties = ties_i8.bool()
    has_gt = gt_mask.any(dim=1, keepdim=True)
    max_iou = torch.where(has_gt, max_iou, torch.zeros_like(max_iou))
    return MatchStats(max_iou, argmax.long(), gt_max, gt_arg, ties)
