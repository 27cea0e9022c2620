"""Triton kernels for box IoU and NMS; the CUDA paths of ``detkit::box_iou``/``nms``/...

Each public launcher has the signature of the op it accelerates. NMS follows torchvision's
CUDA design: a kernel writes a suppression bitmask (bit ``j`` of row ``i`` set when box ``i``
outranks box ``j`` and their IoU exceeds the threshold; 32 bits per int64 word, so no sign
bit games), then a sequential reduction walks the rows in score order, OR-ing the rows of
kept boxes into a "removed" bit vector. The grouped variant does the same per (image, class)
group, one program per group, which is how ``multiclass_nms`` runs a whole batch at once.
Under ``TRITON_INTERPRET=1`` all of this runs on CPU tensors (that is how it is tested).

The arithmetic is the rule of :mod:`detkit.ops.nms`: the IoU in the compute type (float32, or
float64) with correctly rounded division (``div_rn``; Triton's default float32 division is
approximate on GPUs) and without fused multiply-adds (``enable_fp_fusion=False``), compared
with a threshold passed as a one-element tensor of the IoU's type (a float argument would be
float32), so the decisions are the CPU's bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from detkit.ops.nms import _TORCHVISION_OFFSET_TRICK_MAX_NUMEL, _offset_boxes
from detkit.ops.nms_grouped import group_order, iou_threshold_in, promote
from detkit.ops.nms_multiclass import Candidates, multiclass_select

__all__ = ["batched_nms", "box_iou", "grouped_nms_keep", "multiclass_nms", "nms"]

_WORD = 32  # boxes per mask word


@triton.jit
def _load_box(ptr, idx, valid):
    x1 = tl.load(ptr + idx * 4 + 0, mask=valid, other=0.0)
    y1 = tl.load(ptr + idx * 4 + 1, mask=valid, other=0.0)
    x2 = tl.load(ptr + idx * 4 + 2, mask=valid, other=0.0)
    y2 = tl.load(ptr + idx * 4 + 3, mask=valid, other=0.0)
    return x1, y1, x2, y2


@triton.jit
def _divide(a, b):
    """Correctly rounded ``a / b`` (Triton's float32 ``/`` is approximate on GPUs)."""
    if a.dtype == tl.float32:
        return tl.math.div_rn(a, b)
    return a / b


@triton.jit
def _pair_iou(ax1, ay1, ax2, ay2, bx1, by1, bx2, by2):
    """IoU of a column of boxes ``a[:, None]`` against a row ``b[None, :]``; torchvision's ops."""
    width = tl.maximum(
        tl.minimum(ax2[:, None], bx2[None, :]) - tl.maximum(ax1[:, None], bx1[None, :]), 0.0
    )  # noqa: E501
    height = tl.maximum(
        tl.minimum(ay2[:, None], by2[None, :]) - tl.maximum(ay1[:, None], by1[None, :]), 0.0
    )  # noqa: E501
    inter = height * width
    area_a = (ax2 - ax1) * (ay2 - ay1)
    area_b = (bx2 - bx1) * (by2 - by1)
    return _divide(inter, area_a[:, None] + area_b[None, :] - inter)


@triton.jit
def _box_iou_kernel(a_ptr, b_ptr, out_ptr, n, m, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    batch = tl.program_id(2)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    ax1, ay1, ax2, ay2 = _load_box(a_ptr + batch * n * 4, rows, rows < n)
    bx1, by1, bx2, by2 = _load_box(b_ptr + batch * m * 4, cols, cols < m)
    iou = _pair_iou(ax1, ay1, ax2, ay2, bx1, by1, bx2, by2)
    out = out_ptr + batch * n * m + rows[:, None] * m + cols[None, :]
    tl.store(out, iou, mask=(rows[:, None] < n) & (cols[None, :] < m))


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise IoU ``[..., N, 4] x [..., M, 4] -> [..., N, M]`` (tiled Triton kernel)."""
    a, b = promote(boxes1, boxes2)
    batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    n, m = a.shape[-2], b.shape[-2]
    flat = int(torch.Size(batch).numel())
    a = a.expand(*batch, n, 4).reshape(flat, n, 4).contiguous()
    b = b.expand(*batch, m, 4).reshape(flat, m, 4).contiguous()
    out = torch.empty((a.shape[0], n, m), dtype=a.dtype, device=a.device)
    if out.numel() > 0:
        grid = (triton.cdiv(n, 32), triton.cdiv(m, 32), a.shape[0])
        _box_iou_kernel[grid](a, b, out, n, m, BLOCK_N=32, BLOCK_M=32, enable_fp_fusion=False)
    return out.reshape(*batch, n, m)


@triton.jit
def _suppression_mask_kernel(
    boxes_ptr,
    starts_ptr,
    counts_ptr,
    mask_ptr,
    threshold_ptr,
    max_count,
    words,
    BLOCK: tl.constexpr,
    WORD: tl.constexpr,
):
    """mask[g, r, w] bit c: box r of group g suppresses box (w * WORD + c) of the group."""
    group = tl.program_id(2)
    start = tl.load(starts_ptr + group)
    count = tl.load(counts_ptr + group)
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    word = tl.program_id(1)
    cols = word * WORD + tl.arange(0, WORD)
    ax1, ay1, ax2, ay2 = _load_box(boxes_ptr, start + rows, rows < count)
    bx1, by1, bx2, by2 = _load_box(boxes_ptr, start + cols, cols < count)
    iou = _pair_iou(ax1, ay1, ax2, ay2, bx1, by1, bx2, by2)
    threshold = tl.load(threshold_ptr)  # in the IoU's type (see the module docstring)
    later = (cols[None, :] > rows[:, None]) & (cols[None, :] < count)
    hit = (iou > threshold) & later
    shifts = tl.arange(0, WORD).to(tl.int64)
    bits = tl.sum(tl.where(hit, tl.full(hit.shape, 1, tl.int64) << shifts[None, :], 0), axis=1)
    out = mask_ptr + (group * max_count + rows) * words + word
    tl.store(out, bits, mask=rows < max_count)


@triton.jit
def _reduce_mask_kernel(
    mask_ptr,
    starts_ptr,
    counts_ptr,
    keep_ptr,
    max_count,
    words,
    BLOCK_W: tl.constexpr,
    WORD: tl.constexpr,
):
    """Greedy pass over one group's rows in score order (one program per group)."""
    group = tl.program_id(0)
    start = tl.load(starts_ptr + group)
    count = tl.load(counts_ptr + group)
    offs = tl.arange(0, BLOCK_W)
    removed = tl.zeros((BLOCK_W,), dtype=tl.int64)
    for row in range(0, count):
        current = tl.sum(tl.where(offs == row // WORD, removed, 0), axis=0)
        is_removed = (current >> (row % WORD)) & 1
        line = tl.load(
            mask_ptr + (group * max_count + row) * words + offs, mask=offs < words, other=0
        )
        removed = removed | tl.where(is_removed == 0, line, 0)
        tl.store(keep_ptr + start + row, (1 - is_removed).to(tl.int8))


def _grouped_keep(boxes: Tensor, starts: Tensor, counts: Tensor, iou_threshold: float) -> Tensor:
    """Keep mask over ``boxes`` laid out as contiguous groups sorted by score within a group."""
    n = boxes.shape[0]
    keep = torch.zeros(n, dtype=torch.int8, device=boxes.device)
    if n == 0:
        return keep.bool()
    max_count = int(counts.max())
    words = triton.cdiv(max_count, _WORD)
    groups = counts.numel()
    mask = torch.empty((groups, max_count, words), dtype=torch.int64, device=boxes.device)
    boxes = boxes.contiguous()
    threshold = torch.tensor(
        [iou_threshold_in(boxes.dtype, iou_threshold)], dtype=boxes.dtype, device=boxes.device
    )
    grid = (triton.cdiv(max_count, 32), words, groups)
    _suppression_mask_kernel[grid](
        boxes,
        starts,
        counts,
        mask,
        threshold,
        max_count,
        words,
        BLOCK=32,
        WORD=_WORD,
        enable_fp_fusion=False,
    )
    block_w = triton.next_power_of_2(words)
    _reduce_mask_kernel[(groups,)](
        mask, starts, counts, keep, max_count, words, BLOCK_W=block_w, WORD=_WORD
    )
    return keep.bool()


def grouped_nms_keep(boxes: Tensor, groups: Tensor, iou_threshold: float) -> Tensor:
    """Triton twin of :func:`detkit.ops.nms.grouped_nms_keep` (inputs sorted by group)."""
    _, counts = torch.unique_consecutive(groups, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    return _grouped_keep(boxes, starts, counts, iou_threshold)


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Greedy NMS with a suppression bitmask; same keep indices as torchvision.ops.nms."""
    boxes, scores = promote(boxes, scores)
    order = torch.sort(scores, descending=True, stable=True).indices
    n = order.numel()
    starts = torch.zeros(1, dtype=torch.int64, device=boxes.device)
    counts = torch.full((1,), n, dtype=torch.int64, device=boxes.device)
    return order[_grouped_keep(boxes[order], starts, counts, iou_threshold)]


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """Per-class NMS; same path choice (offset trick or per-class) as the CPU op."""
    boxes, scores = promote(boxes, scores)
    if boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    if boxes.numel() <= _TORCHVISION_OFFSET_TRICK_MAX_NUMEL:
        return nms(_offset_boxes(boxes, idxs), scores, iou_threshold)
    order = group_order(scores, idxs)
    keep = torch.sort(order[grouped_nms_keep(boxes[order], idxs[order], iou_threshold)]).values
    return keep[scores[keep].sort(descending=True)[1]]


def _multiclass_keep(cands: Candidates, iou_threshold: float) -> Tensor:
    """``multiclass_select``'s grouped NMS: score order inside each group, then the kernels."""
    order = group_order(cands.scores, cands.groups, cands.box)
    keep = torch.empty_like(order, dtype=torch.bool)
    keep[order] = grouped_nms_keep(cands.boxes[order], cands.groups[order], iou_threshold)
    return keep


def multiclass_nms(
    boxes: Tensor,
    scores: Tensor,
    score_threshold: float,
    iou_threshold: float,
    max_detections: int,
    pre_nms_top_k: int | None = None,
    per_class_top_k: int | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Batched class-aware NMS, the grouped bitmask kernels doing the suppression."""
    return multiclass_select(
        boxes,
        scores,
        score_threshold,
        iou_threshold,
        max_detections,
        pre_nms_top_k,
        per_class_top_k,
        _multiclass_keep,
    )
