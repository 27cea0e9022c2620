"""Greedy NMS inside many groups at once: the CPU engine of ``multiclass_nms``.

The arithmetic follows the rule written in :mod:`detkit.ops.nms` (the helpers that implement
it, :func:`promote` and :func:`iou_threshold_in`, live here so every path imports one copy).

Two exact algorithms, and :func:`pairs_worth_it` to pick one from sizes measured per call:

- **Pair graph.** Inside each group, boxes sorted by ``x1``: box ``j`` after box ``i`` can
  only reach IoU > t when ``x1_j < x2_i - t * w_i`` (the x-overlap must exceed ``t`` times
  either width), so one ``searchsorted`` gives each box its window of partners. IoU is
  computed for those pairs only, in dense blocks (rows x window offsets, over strided views
  of the sorted boxes); pairs above the threshold become edges from the better-ranked box
  to the other, and greedy NMS is the unique assignment where a box is kept iff no kept box
  has an edge into it, found by peeling: boxes without live incoming edges are kept, their
  targets suppressed, edges out of suppressed boxes dropped, repeat.
- **torchvision's compiled kernel** once per group (ties go by index, as in the pair graph).
  Its early exit (a suppressed box is never compared again) wins when boxes pile up in a few
  places, where the x-windows prune little and most pairs would be computed for nothing.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import torchvision  # noqa: F401 - registers torch.ops.torchvision
from torch import Tensor

from detkit.ops._library import upcast_float32

# Window IoUs are computed in blocks of consecutive rows, about this many IoUs per block (a
# few MB per temporary) and rows counted in steps of _BLOCK_ROWS.
_BLOCK_ELEMENTS = 1 << 18
_BLOCK_ROWS = 128
# The pruning test uses 0.999 * t: far more slack than the few float32 roundings between the
# exact x-overlap and the IoU a kernel computes (see ``x_windows``).
_WINDOW_SLACK = 0.999
# One torchvision call per group costs about this many window IoUs (measured on CPU, 1 thread:
# ~13 ns per window IoU, ~16 ns per kernel comparison, 0.1-0.2 ms per call with its slicing).
_CALL_COST = 10_000


def promote(boxes: Tensor, scores: Tensor) -> tuple[Tensor, Tensor]:
    """Both to the compute type: float64 if either is float64, else float32."""
    boxes, scores = upcast_float32(boxes), upcast_float32(scores)
    dtype = torch.float64 if torch.float64 in (boxes.dtype, scores.dtype) else torch.float32
    return boxes.to(dtype), scores.to(dtype)


@functools.lru_cache(maxsize=64)  # two small tensors and a sync per call otherwise
def float32_threshold(iou_threshold: float) -> float:
    """The largest float32 ``t32 <= t``: ``iou > t32`` in float32 equals ``iou > t`` exactly.

    torchvision's kernels compare a float IoU with a double threshold; comparing with the
    nearest float32 would differ when rounding goes up (e.g. 0.6, 0.3).
    """
    t32 = torch.tensor(iou_threshold, dtype=torch.float32)
    if t32.item() > iou_threshold:
        t32 = torch.nextafter(t32, torch.tensor(-math.inf))
    return float(t32.item())


def iou_threshold_in(dtype: torch.dtype, iou_threshold: float) -> float:
    """The threshold to compare an IoU of ``dtype`` with, in ``dtype``: the same decisions as
    comparing it exactly with the double ``iou_threshold`` (float64: the value itself)."""
    return iou_threshold if dtype == torch.float64 else float32_threshold(iou_threshold)


def take(values: Tensor, index: Tensor) -> Tensor:
    """``values[index]`` along dim 0, as ``index_select``: on CPU several times faster than
    advanced indexing (which this engine would otherwise spend much of its time in)."""
    return values.index_select(0, index)


def _float32_key(values: Tensor) -> Tensor:
    """int64 keys in [0, 2**32) ordered as the float32 values (``-0.0 == 0.0``)."""
    bits = (values.float() + 0.0).view(torch.int32).to(torch.int64)
    return torch.where(bits < 0, ~bits & 0xFFFFFFFF, bits | 0x80000000)


def _descending_key(scores: Tensor) -> Tensor:
    """int64 keys whose ascending order is the float32 scores' descending order."""
    return 0xFFFFFFFF - _float32_key(scores)


def group_order(scores: Tensor, groups: Tensor, tiebreak: Tensor | None = None) -> Tensor:
    """Permutation sorting by (group, score descending, tiebreak, index): torchvision's visit
    order inside each group when ``tiebreak`` is the position in torchvision's input."""
    order = torch.arange(scores.numel(), device=scores.device)
    if tiebreak is not None:
        order = torch.sort(groups.to(torch.int64) * (1 << 32) + tiebreak, stable=True).indices
    groups, scores = take(groups, order), take(scores, order)
    return take(order, _group_stable_sort(groups, scores, descending=True))


def _group_stable_sort(groups: Tensor, values: Tensor, descending: bool) -> Tensor:
    """Stable permutation sorting by (group, value): ties keep their input order."""
    if values.dtype == torch.float32:
        # One stable sort of a (group, value) composite key instead of two stable sorts.
        value_key = _descending_key(values) if descending else _float32_key(values)
        key = groups.to(torch.int64) * (1 << 32) + value_key
        return torch.sort(key, stable=True).indices
    by_value = torch.sort(values, descending=descending, stable=True).indices
    return take(by_value, torch.sort(take(groups, by_value), stable=True).indices)


def x_order(boxes: Tensor, dim: int = -1) -> Tensor:
    """Stable ``argsort`` of ``x1`` (``boxes[..., 0]``) along ``dim`` of the leading dims."""
    return torch.sort(boxes[..., 0], dim=dim, stable=True).indices


def group_x_order(groups: Tensor, x1: Tensor) -> Tensor:
    """Stable permutation sorting by (group, ``x1``): ties keep their input order."""
    return _group_stable_sort(groups, x1, descending=False)


class Windows(NamedTuple):
    """Each box's partners ``(i, end_i)`` and the row blocks they are computed in."""

    ends: Tensor  # one past the last partner of each box
    blocks: list[tuple[int, int, int]]  # (first row, last row, window width) per block
    elements: int  # IoUs the blocks compute, padding included: the cost of the pair graph


def x_windows(boxes: Tensor, groups: Tensor, iou_threshold: float) -> Windows:
    """For boxes sorted by (group, x1): the later boxes of the group each box can suppress.

    A later box ``j`` of the group can reach IoU > t only if ``x1_j < x2_i - t * w_i`` (IoU > t
    needs the x-overlap, at most ``x2_i - x1_j``, above ``t * w_i``). The groups are laid side
    by side on one line (each shifted by more than twice any group's extent) so that one
    ``searchsorted`` finds every window. The bound uses ``0.999 t`` and a margin above every
    rounding on that line (relative 2**-20 in float32, 2**-40 in float64), so a pruned pair
    can never have a computed IoU > t; rounding only ever widens windows.
    """
    if boxes.shape[0] == 0:
        return Windows(groups.new_zeros(0), [], 0)
    # float32 keeps the line exact enough for up to 2**16 groups of coordinates below 2**40.
    small = int(groups[-1]) < 1 << 16 and float(boxes[:, 0::2].abs().max()) < 2.0**40
    dtype = boxes.dtype if small else torch.float64
    x1, x2 = boxes[:, 0].to(dtype), boxes[:, 2].to(dtype)
    width = x2 - x1
    bound = x2 - (_WINDOW_SLACK * iou_threshold) * width
    low = float(x1.min())
    span = 2.0 * (max(float(bound.max()), float(x1.max())) - low) + 1.0
    shift = groups.to(dtype) * span - low
    keys = x1 + shift
    query = bound + shift
    query += (query.abs() + x2.abs() + width.abs()) * (
        2.0**-20 if dtype == torch.float32 else 2.0**-40
    )
    ends = torch.searchsorted(keys, query, right=True)
    return Windows(ends, *_row_blocks(_window_lengths(ends)))


def _window_lengths(ends: Tensor) -> Tensor:
    return (ends - torch.arange(ends.numel(), device=ends.device) - 1).clamp_(min=0)


def _row_blocks(lengths: Tensor) -> tuple[list[tuple[int, int, int]], int]:
    """Consecutive rows in blocks of about ``_BLOCK_ELEMENTS`` IoUs (rows x widest window)."""
    n = lengths.numel()
    widths = torch.nn.functional.pad(lengths, (0, -n % _BLOCK_ROWS))
    widths = widths.view(-1, _BLOCK_ROWS).amax(dim=1).tolist() if n else []
    blocks, elements = [], 0
    first, width = 0, 0
    for index, w in enumerate(widths):
        last = min(n, (index + 1) * _BLOCK_ROWS)
        if width and (last - first) * max(width, w) > _BLOCK_ELEMENTS:
            blocks.append((first, index * _BLOCK_ROWS, width))
            elements += (index * _BLOCK_ROWS - first) * width
            first, width = index * _BLOCK_ROWS, 0
        width = max(width, w)
    if width:
        blocks.append((first, n, width))
        elements += (n - first) * width
    return blocks, elements


def window_edges(boxes: Tensor, windows: Windows, iou_threshold: float):
    """The pairs ``(i, j)`` of the windows whose IoU exceeds the threshold.

    Each block of rows is one dense ``[rows, width]`` computation over strided views of the
    next ``width`` boxes (no per-pair index arrays or gathers): torchvision's operations in
    its order, except ``max(x1_i, x1_j)``, which is ``x1_j`` since rows are sorted by ``x1``.
    """
    threshold = iou_threshold_in(boxes.dtype, iou_threshold)
    widest = max((width for _, _, width in windows.blocks), default=0)
    x1, y1, x2, y2 = boxes.t()
    # Columns padded past the end, so that every row has ``width`` later entries to view.
    columns = torch.nn.functional.pad(
        torch.stack([x1, y1, x2, y2, (x2 - x1) * (y2 - y1)]), (0, widest)
    )
    lengths = _window_lengths(windows.ends)
    sources, targets = [], []
    for first, last, width in windows.blocks:
        row, offset = _block_hits(columns, first, last, width, threshold)
        inside = offset < take(lengths, first + row)  # blocks have the widest window
        row, offset = row[inside], offset[inside]
        sources.append(row + first)
        targets.append(row + first + 1 + offset)
    if not sources:
        empty = torch.empty(0, dtype=torch.int64, device=boxes.device)
        return empty, empty
    return torch.cat(sources), torch.cat(targets)


def _block_hits(columns: Tensor, first: int, last: int, width: int, threshold: float):
    """``(row, offset)`` where IoU(box first + row, box first + row + 1 + offset) > threshold."""
    mine = columns[:, first:last, None]  # [5, rows, 1]
    later = columns[:, first + 1 : last + width].unfold(1, width, 1)  # [5, rows, width]
    x1, y1, x2, y2, area = later
    w = torch.minimum(mine[2], x2).sub_(x1).clamp_(min=0)
    h = torch.minimum(mine[3], y2).sub_(torch.maximum(mine[1], y1)).clamp_(min=0)
    inter = w.mul_(h)
    union = torch.add(mine[4], area).sub_(inter)
    return torch.nonzero(inter.div_(union) > threshold, as_tuple=True)


def outranks(scores: Tensor, tiebreak: Tensor, u: Tensor, v: Tensor) -> Tensor:
    """Whether ``u`` comes before ``v`` in the visit order (score desc, then tiebreak asc)."""
    su, sv = take(scores, u), take(scores, v)
    return (su > sv) | ((su == sv) & (take(tiebreak, u) < take(tiebreak, v)))


def greedy_keep(n: int, src: Tensor, dst: Tensor) -> Tensor:
    """Greedy NMS from its suppression graph (edges from the better-ranked box).

    Peeling: a box no live edge points into is kept, the targets of its edges are suppressed,
    and edges out of suppressed boxes are dropped. Each round settles at least the best
    unsettled box of every group, so it ends; the keep mask is greedy NMS's exactly.
    """
    device = src.device
    keep = torch.ones(n, dtype=torch.bool, device=device)
    open_ = torch.ones(n, dtype=torch.bool, device=device)
    while src.numel():
        pointed = torch.zeros(n, dtype=torch.bool, device=device).index_fill_(0, dst, True)
        kept_now = open_ & ~pointed
        open_ &= pointed
        hit = dst[take(kept_now, src)]
        suppressed = torch.zeros(n, dtype=torch.bool, device=device).index_fill_(0, hit, True)
        keep &= ~suppressed
        open_ &= ~suppressed
        live = take(open_, src) & take(open_, dst)
        src, dst = src[live], dst[live]
    return keep


def torchvision_group_keep(
    boxes: Tensor, scores: Tensor, groups: Tensor, tiebreak: Tensor, iou_threshold: float
) -> Tensor:
    """Keep mask from torchvision's compiled NMS, called once per group of two or more."""
    order = group_order(scores, groups, tiebreak)
    _, counts = torch.unique_consecutive(take(groups, order), return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    keep_sorted = counts.new_zeros(order.numel(), dtype=torch.bool)
    keep_sorted[starts[counts == 1]] = True
    sorted_boxes, sorted_scores = take(boxes, order), take(scores, order)
    nms = torch.ops.torchvision.nms
    for start, count in zip(starts[counts > 1].tolist(), counts[counts > 1].tolist(), strict=True):
        end = start + count
        kept = nms(sorted_boxes[start:end], sorted_scores[start:end], iou_threshold)
        keep_sorted[start + kept] = True
    keep = torch.empty_like(keep_sorted)
    keep[order] = keep_sorted
    return keep


def pairs_worth_it(elements: int, counts: Tensor) -> bool:
    """Whether ``elements`` window IoUs should beat torchvision's kernel once per group.

    torchvision's kernel compares each kept box with every later box of its group, at about
    twice the cost of a window IoU; the windows skip pairs far apart in x, the kernel skips
    suppressed boxes. Which one skips more depends on how many boxes survive, unknown before:
    the kernel is assumed to keep a quarter of each group (so it pays ``sum(n^2) / 2 / 2``),
    plus ``_CALL_COST`` per group for the Python loop and sort around each call. Where boxes
    spread out (most detector outputs) the windows are far smaller; where they pile up, the
    windows cover whole groups and the kernel's early exit takes over.
    """
    counts = counts.double()
    all_pairs = float((counts * (counts - 1)).sum()) / 2
    calls = int((counts > 1).sum())
    return elements <= all_pairs / 2 + _CALL_COST * calls
