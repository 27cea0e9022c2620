"""The body of ``multiclass_nms``: candidates, greedy NMS per (image, class), padded outputs.

Masks and sorts over the whole batch, no Python loop over images or classes:

1. Candidates: a ``[B, C, N]`` mask of scores above the threshold, narrowed by the top-k
   rules (:func:`top_k_mask` on the crowded rows only: ``torch.topk`` finds the k-th value,
   equal values at the boundary go to the lower index), then enumerated in (image, class,
   ``x1``) order by permuting the mask's box axis: the pair graph of
   :mod:`detkit.ops.nms_grouped` needs each group sorted by ``x1``, and permuting the mask
   costs one pass over it where sorting the candidates would cost a sort.
2. NMS per (image, class): ``keep_fn`` (CPU: :func:`cpu_keep`; CUDA: the Triton kernels).
3. The best ``K`` survivors of each image in (score, class, box) order (:func:`select_top`).

On the CPU, :func:`cpu_select` first offers the inputs to the dense table of
:mod:`detkit.ops.nms_dense`, which takes few candidates in fewer calls.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from detkit.ops.nms_dense import dense_select
from detkit.ops.nms_grouped import (
    Windows,
    greedy_keep,
    group_order,
    group_x_order,
    outranks,
    pairs_worth_it,
    promote,
    take,
    torchvision_group_keep,
    window_edges,
    x_order,
    x_windows,
)

# Cost of an image-level window IoU relative to a per-class one: it also pays a C-wide
# membership test for every edge it finds (measured: 1.4x to 2.9x, densest scores highest).
_IMAGE_PAIR_COST = 1.5
# Below this many per-class window IoUs (a few ms) the per-image windows, which cost about
# as much just to size, are not looked at.
_PER_IMAGE_MIN = 1 << 20
# Per-class top-k transposes all the scores (one pass) when more than 1/_MANY of the
# (image, class) rows hold too many candidates, else it gathers those rows (a strided
# gather of every row measured several times slower than the transpose).
_MANY = 16
# Candidates are sorted on their own (not through the x1 order of all the boxes) when the
# boxes outnumber them this many times: sorting M keys against sorting B * N and a pass
# over the [B, C, N] mask (measured: the own sort wins up to M ~ 0.8 B N, loses from 4 B N).
_SPARSE = 2


class Candidates(NamedTuple):
    """(image, class, box) candidates in (image, class, x1) order, and where they came from."""

    image: Tensor
    label: Tensor
    box: Tensor  # index into the N boxes of the image
    scores: Tensor
    boxes: Tensor  # [M, 4] in the compute type
    groups: Tensor  # image * C + label, non-decreasing
    mask: Tensor  # [B, C, N] candidate mask
    image_boxes: Tensor  # the [B, N, 4] or [B, N, C, 4] input boxes, compute type


def count_true(mask: Tensor, dim: int) -> Tensor:
    """``mask.sum(dim)`` as int32 (summing bytes: several times faster than a bool sum)."""
    return mask.view(torch.uint8).sum(dim=dim, dtype=torch.int32)


def top_k_mask(
    values: Tensor, valid: Tensor, k: int, tiebreak: Tensor | None = None, *, floor: bool = False
) -> Tensor:
    """The ``k`` largest ``values`` among ``valid`` in each row (last dim), for rows holding
    more than ``k`` valid entries; equal values at the boundary go to the lowest ``tiebreak``
    (default: the position).

    ``floor``: the valid entries are exactly the values above some floor (a threshold, or
    -inf), so a row's k best values are valid ones and need no masking (``topk`` ranks NaN
    first, so rows holding NaN are masked all the same).
    """
    if k == 0:
        return torch.zeros_like(valid)
    if not floor:
        values = values.masked_fill(~valid, float("-inf"))
    kth = values.topk(k, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)
    nan = torch.isnan(kth[..., 0])
    if bool(nan.any()):
        masked = values[nan].masked_fill(~valid[nan], float("-inf"))
        kth[nan] = masked.topk(k, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)
    above = values > kth
    ties = values == kth
    room = k - count_true(above, -1)  # >= 1: kth itself is a tie
    over = count_true(ties, -1) > room
    if bool(over.any()):  # more equal values at the boundary than room (rare)
        ties[over] = _lowest(
            ties[over], room[over], tiebreak[over] if tiebreak is not None else None
        )
    return above | ties


def _lowest(ties: Tensor, room: Tensor, tiebreak: Tensor | None) -> Tensor:
    """The ``room`` entries of lowest ``tiebreak`` (default: position) among ``ties``, by row."""
    if tiebreak is None:
        tiebreak = torch.arange(ties.shape[-1], device=ties.device).expand(ties.shape)
    key = torch.where(ties, tiebreak, torch.iinfo(torch.int64).max)
    cutoff = torch.sort(key, dim=-1).values.gather(-1, room.to(torch.int64)[:, None] - 1)
    return ties & (key <= cutoff)


def candidate_mask(scores: Tensor, score_threshold: float, per_class_top_k, pre_nms_top_k):
    """``[B, C, N]`` mask: above the threshold, then per-class and per-image top-k (only the
    rows holding more than k candidates go through ``topk``)."""
    batch, n, num_classes = scores.shape
    mask = (scores > score_threshold).transpose(1, 2).contiguous()
    rows = mask.view(batch * num_classes, n)
    by_class = None  # scores as [B * C, N], transposed only if many rows need it
    if per_class_top_k is not None and per_class_top_k < n:
        crowded = count_true(rows, 1) > per_class_top_k
        if bool(crowded.all()):  # dense scores: every row, no gathers
            by_class = scores.transpose(1, 2).reshape(batch * num_classes, n)
            rows.copy_(top_k_mask(by_class, rows, per_class_top_k, floor=True))
        elif bool(crowded.any()):
            (row,) = torch.nonzero(crowded, as_tuple=True)
            if row.numel() * _MANY > rows.shape[0]:
                by_class = scores.transpose(1, 2).reshape(batch * num_classes, n)
                values = take(by_class, row)
            else:
                values = scores[row // num_classes, :, row % num_classes]
            top = top_k_mask(values, take(rows, row), per_class_top_k, floor=True)
            rows.index_copy_(0, row, top)
    if pre_nms_top_k is not None and pre_nms_top_k < n * num_classes:
        flat = mask.view(batch, -1)  # (class, box) order: equal scores go to the lower class
        (image,) = torch.nonzero(count_true(flat, 1) > pre_nms_top_k, as_tuple=True)
        if image.numel():
            values = (by_class.view(batch, -1) if by_class is not None else scores.transpose(1, 2))[
                image
            ].reshape(image.numel(), -1)
            # After per-class top-k the valid entries are no longer those above the threshold.
            floor = per_class_top_k is None
            top = top_k_mask(values, take(flat, image), pre_nms_top_k, floor=floor)
            flat.index_copy_(0, image, top)
    return mask


def enumerate_candidates(boxes: Tensor, scores: Tensor, mask: Tensor) -> Candidates:
    """The candidates of ``mask`` in (image, class, x1) order, ties in box order.

    Boxes shared by the classes are put in x1 order by permuting the mask's box axis (one
    sort of all ``B * N`` boxes and a pass over the mask) or, when the candidates are fewer
    than half the boxes (a trained model's scores), by sorting just the candidates (0.6 ms
    -> 0.25 ms for the digits YOLO's 770 candidates of 8 x 1344 boxes).
    """
    batch, num_classes, n = mask.shape
    if boxes.dim() == 3 and int(count_true(mask.view(-1), 0)) * _SPARSE < batch * n:
        image, label, box = torch.nonzero(mask, as_tuple=True)  # (image, class, box) order
        x1 = take(boxes[..., 0].reshape(-1), image * n + box)
        order = group_x_order(image * num_classes + label, x1)
        image, label, box = take(image, order), take(label, order), take(box, order)
        cand_boxes = take(boxes.view(-1, 4), image * n + box)
    elif boxes.dim() == 3:
        order = x_order(boxes)  # [B, N]
        index = order[:, None, :].expand(batch, num_classes, n)
        permuted = mask.view(torch.uint8).gather(2, index)  # (faster than a bool gather)
        image, label, pos = torch.nonzero(permuted, as_tuple=True)
        box = take(order.view(-1), image * n + pos)
        cand_boxes = take(boxes.view(-1, 4), image * n + box)
    else:
        order = x_order(boxes.transpose(1, 2))  # [B, C, N]
        image, label, pos = torch.nonzero(mask.gather(2, order), as_tuple=True)
        box = take(order.reshape(-1), (image * num_classes + label) * n + pos)
        cand_boxes = take(boxes.view(-1, 4), (image * n + box) * num_classes + label)
    if scores.is_contiguous():
        cand_scores = take(scores.view(-1), (image * n + box) * num_classes + label)
    else:
        cand_scores = scores[image, box, label]
    return Candidates(
        image=image,
        label=label,
        box=box,
        scores=cand_scores,
        boxes=cand_boxes,
        groups=image * num_classes + label,
        mask=mask,
        image_boxes=boxes,
    )


def cpu_keep(cands: Candidates, iou_threshold: float) -> Tensor:
    """Keep mask over the candidates, by the cheapest exact method for their sizes.

    The cost of the pair graph is known before any IoU is computed (the windows' sizes): per
    (image, class) group, and for boxes shared by all classes also per image (one IoU per
    pair of boxes instead of one per class holding both, which pays when classes share
    candidates: dense scores, no per-class top-k). If even the cheaper one is expensive for
    the group sizes, torchvision's kernel runs once per group (:func:`pairs_worth_it`).
    """
    n = cands.image.numel()
    if n < 2:
        return torch.ones(n, dtype=torch.bool, device=cands.boxes.device)
    if not bool(torch.isfinite(cands.boxes).all()):  # the window argument needs finite boxes
        return _torchvision_keep(cands, iou_threshold)
    plan = _plan_windows(cands, iou_threshold)
    _, counts = torch.unique_consecutive(cands.groups, return_counts=True)
    cost = plan.windows.elements * (_IMAGE_PAIR_COST if plan.per_image else 1)
    if not pairs_worth_it(int(cost), counts):
        return _torchvision_keep(cands, iou_threshold)
    if plan.per_image:
        u, v = window_edges(plan.boxes, plan.windows, iou_threshold)
        u, v = _class_edges(cands, plan.image[u], plan.box[u], plan.box[v])
    else:
        u, v = window_edges(cands.boxes, plan.windows, iou_threshold)
    first = outranks(cands.scores, cands.box, u, v)
    return greedy_keep(n, torch.where(first, u, v), torch.where(first, v, u))


def _torchvision_keep(cands: Candidates, iou_threshold: float) -> Tensor:
    return torchvision_group_keep(cands.boxes, cands.scores, cands.groups, cands.box, iou_threshold)


class _Plan(NamedTuple):
    per_image: bool
    windows: Windows
    boxes: Tensor | None = None  # per image: the boxes that are a candidate in any class,
    image: Tensor | None = None  # their image
    box: Tensor | None = None  # and index


def _plan_windows(cands: Candidates, iou_threshold: float) -> _Plan:
    """Per (image, class) windows, or per image ones when those should be cheaper.

    Per-class windows repeat an image pair in every class holding both boxes: about
    ``C * q^2`` classes if a box's classes were independent of its place, ``q`` the share of
    (present box, class) slots that are candidates. When that estimate clearly favours one
    kind, only that kind is computed; in between both are sized and compared exactly
    (per-image ones only past ``_PER_IMAGE_MIN`` per-class IoUs, below which it can't pay).
    """
    boxes, mask = cands.image_boxes, cands.mask
    if boxes.dim() != 3:  # class-specific boxes: no IoU is shared between classes
        return _Plan(False, x_windows(cands.boxes, cands.groups, iou_threshold))
    batch, num_classes, _ = mask.shape
    in_any = count_true(mask, 1) > 0  # [B, N]
    present = int(count_true(in_any, 1).sum())
    share = cands.image.numel() / max(present * num_classes, 1)
    repeats = num_classes * share * share  # per-class IoUs per per-image IoU, estimated
    group = None
    if repeats < _IMAGE_PAIR_COST * 4:
        group = x_windows(cands.boxes, cands.groups, iou_threshold)
        if repeats < _IMAGE_PAIR_COST / 2 or group.elements < _PER_IMAGE_MIN:
            return _Plan(False, group)
    order = x_order(boxes)
    rows = torch.arange(batch, device=mask.device)[:, None]
    image, pos = torch.nonzero(in_any[rows, order], as_tuple=True)
    box = order[image, pos]
    windows = x_windows(boxes[image, box], image, iou_threshold)
    if group is not None and windows.elements * _IMAGE_PAIR_COST >= group.elements:
        return _Plan(False, group)
    return _Plan(True, windows, boxes[image, box], image, box)


def _class_edges(cands: Candidates, image: Tensor, box_a: Tensor, box_b: Tensor):
    """Candidate index pairs ``(a, b)`` for every class where both boxes are candidates."""
    batch, num_classes, n = cands.mask.shape
    member = cands.mask.transpose(1, 2).reshape(batch * n, num_classes)
    a, b = image * n + box_a, image * n + box_b
    edge, label = torch.nonzero(take(member, a) & take(member, b), as_tuple=True)
    ids = torch.empty(batch * num_classes * n, dtype=torch.int64, device=image.device)
    ids.scatter_(
        0, cands.groups * n + cands.box, torch.arange(cands.image.numel(), device=image.device)
    )
    row = (take(image, edge) * num_classes + label) * n
    return take(ids, row + take(box_a, edge)), take(ids, row + take(box_b, edge))


def _ranked_survivors(cands: Candidates, keep: Tensor, max_detections: int):
    """Kept candidates of rank < K in their image, in (image, score desc, class, box) order:
    ``(image, label, box, scores)``. Images with more than K survivors keep their K best via
    :func:`top_k_mask` on an ``[images, survivors]`` table, then the few left are sorted."""
    batch, _, n = cands.mask.shape
    kept = torch.nonzero(keep, as_tuple=True)[0]  # (image, class, x1) order
    image, scores = take(cands.image, kept), take(cands.scores, kept)
    flat = take(cands.label, kept) * n + take(cands.box, kept)  # (class, box): ties' order
    counts = torch.bincount(image, minlength=batch)
    crowded = counts > max_detections
    if bool(crowded.any()):
        starts = torch.cumsum(counts, 0) - counts
        (mine,) = torch.nonzero(take(crowded, image), as_tuple=True)  # one image per row
        row = take(torch.cumsum(crowded, 0) - 1, take(image, mine))
        col = mine - take(starts, take(image, mine))
        width = int(counts.max())
        cells = row * width + col
        table = scores.new_full((int(crowded.sum()) * width,), float("-inf"))
        table.scatter_(0, cells, take(scores, mine))
        ties = torch.full_like(table, torch.iinfo(torch.int64).max, dtype=torch.int64)
        ties.scatter_(0, cells, take(flat, mine))
        table, ties = table.view(-1, width), ties.view(-1, width)
        best = top_k_mask(table, table > float("-inf"), max_detections, ties, floor=True)
        best = best.view(-1)
        chosen = ~take(crowded, image)
        chosen.scatter_(0, mine, take(best, cells))
        kept, image, flat, scores = kept[chosen], image[chosen], flat[chosen], scores[chosen]
    order = group_order(scores, image, flat)
    kept = take(kept, order)
    return (
        take(cands.image, kept),
        take(cands.label, kept),
        take(cands.box, kept),
        take(scores, order),
    )


def select_top(cands: Candidates, keep: Tensor, max_detections: int):
    """The best ``max_detections`` kept candidates per image, into padded outputs."""
    batch = cands.mask.shape[0]
    image, label, box, scores = _ranked_survivors(cands, keep, max_detections)
    counts = torch.bincount(image, minlength=batch)
    rank = torch.arange(image.numel(), device=image.device) - take(
        torch.cumsum(counts, 0) - counts, image
    )
    boxes = cands.image_boxes
    out_boxes = boxes.new_zeros((batch, max_detections, 4))
    out_scores = scores.new_zeros((batch, max_detections))
    out_labels = torch.zeros((batch, max_detections), dtype=torch.int64, device=image.device)
    out_boxes[image, rank] = boxes[image, box] if boxes.dim() == 3 else boxes[image, box, label]
    out_scores[image, rank] = scores
    out_labels[image, rank] = label
    return out_boxes, out_scores, out_labels, counts


def multiclass_select(
    boxes: Tensor,
    scores: Tensor,
    score_threshold: float,
    iou_threshold: float,
    max_detections: int,
    pre_nms_top_k: int | None,
    per_class_top_k: int | None,
    keep_fn: Callable[[Candidates, float], Tensor],
):
    """Shared body of the CPU and CUDA paths; ``keep_fn`` is the grouped NMS."""
    boxes, scores = promote(boxes, scores)
    boxes = boxes.contiguous()
    mask = candidate_mask(scores, score_threshold, per_class_top_k, pre_nms_top_k)
    cands = enumerate_candidates(boxes, scores, mask)
    return select_top(cands, keep_fn(cands, iou_threshold), max_detections)


def cpu_select(boxes: Tensor, scores: Tensor, *settings):
    """The CPU selection: the dense table for few candidates (:mod:`detkit.ops.nms_dense`),
    else the general engine with :func:`cpu_keep`. ``settings``: ``score_threshold``,
    ``iou_threshold``, ``max_detections``, ``pre_nms_top_k``, ``per_class_top_k``, as
    :func:`multiclass_select` takes them."""
    boxes, scores = promote(boxes, scores)
    few = dense_select(boxes.contiguous(), scores, *settings)
    return few if few is not None else multiclass_select(boxes, scores, *settings, cpu_keep)
