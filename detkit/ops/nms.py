"""Non-maximum suppression: ``nms``, ``batched_nms``, ``multiclass_nms`` and ``soft_nms``.

``nms``, ``batched_nms`` and ``multiclass_nms`` are ``torch.library`` custom ops
(``detkit::nms``, ``detkit::batched_nms``, ``detkit::multiclass_nms``) with fake impls (data
dependent sizes via ``new_dynamic_size``) and Triton CUDA paths in
:mod:`detkit.ops.kernels.boxes_nms`. Everything runs in float32 (half inputs are upcast).

Greedy NMS per group, without a Python loop over groups (CPU path of ``multiclass_nms`` and
of large ``batched_nms``): candidates are sorted by (group, score desc, index); IoU is
computed only for pairs inside a group (a flat pair list, chunked to bound memory); pairs
above the threshold form a sparse "suppresses" graph, and the greedy result is the unique
fixed point of ``keep[j] = not any(keep[i] for edges i -> j)``, reached by iterating from
"keep all" (Cluster-NMS, Zheng et al. 2020: after t rounds the first t ranks are final).
Ties follow torchvision: equal scores are visited in index order (stable sort).
"""

from __future__ import annotations

import math

import torch
import torchvision  # noqa: F401 - registers torch.ops.torchvision
from torch import Tensor

from detkit.ops._library import NAMESPACE, register_triton_cuda, upcast_float32
from detkit.ops.boxes import box_iou

# torchvision's CPU batched_nms switches from the offset trick to a per-class loop here.
_TORCHVISION_OFFSET_TRICK_MAX_NUMEL = 4000
_PAIR_CHUNK = 1 << 22  # pairs per chunk: bounds the pair-list memory to ~100 MB


def float32_threshold(iou_threshold: float) -> float:
    """The largest float32 ``t32 <= t``: ``iou > t32`` in float32 equals ``iou > t`` in double.

    torchvision's kernels compare a float IoU with a double threshold; comparing with the
    float32-rounded threshold would differ when rounding goes up (e.g. 0.6).
    """
    t32 = torch.tensor(iou_threshold, dtype=torch.float32)
    if t32.item() > iou_threshold:
        t32 = torch.nextafter(t32, torch.tensor(-math.inf))
    return float(t32.item())


def _check_nms_args(name: str, boxes: Tensor, scores: Tensor, iou_threshold: float) -> None:
    if boxes.dim() != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"{name}: boxes must be [N, 4], got {tuple(boxes.shape)}")
    if scores.shape != boxes.shape[:1]:
        raise ValueError(f"{name}: scores must be [N] matching boxes, got {tuple(scores.shape)}")
    if not 0.0 <= iou_threshold <= 1.0 or math.isnan(iou_threshold):
        raise ValueError(f"{name}: iou_threshold must be in [0, 1], got {iou_threshold}")


def _common_float(boxes: Tensor, scores: Tensor) -> tuple[Tensor, Tensor]:
    dtype = torch.float64 if torch.float64 in (boxes.dtype, scores.dtype) else torch.float32
    return boxes.to(dtype), scores.to(dtype)


def _descending_key(scores: Tensor) -> Tensor:
    """int64 keys whose ascending order is the float32 scores' descending order."""
    bits = (scores + 0.0).view(torch.int32).to(torch.int64)  # + 0.0 turns -0.0 into 0.0
    ordered = torch.where(bits < 0, ~bits & 0xFFFFFFFF, bits | 0x80000000)
    return 0xFFFFFFFF - ordered


def group_order(scores: Tensor, groups: Tensor) -> Tensor:
    """Permutation sorting by (group, score descending, index) - torchvision's visit order."""
    if scores.dtype == torch.float32 and scores.numel() > 0:
        # One stable sort of a (group, score) composite key instead of two stable sorts.
        key = groups.to(torch.int64) * (1 << 32) + _descending_key(scores)
        return torch.sort(key, stable=True).indices
    by_score = torch.sort(scores, descending=True, stable=True).indices
    return by_score[torch.sort(groups[by_score], stable=True).indices]


def grouped_nms_keep(boxes: Tensor, groups: Tensor, iou_threshold: float) -> Tensor:
    """Greedy NMS inside each group; ``boxes``/``groups`` sorted by ``group_order``.

    Returns a bool keep mask over the sorted list.
    """
    n = boxes.shape[0]
    keep = torch.ones(n, dtype=torch.bool, device=boxes.device)
    if n < 2:
        return keep
    _, counts = torch.unique_consecutive(groups, return_counts=True)
    ends = torch.repeat_interleave(torch.cumsum(counts, 0), counts)
    partners_cum = torch.cumsum(ends - torch.arange(n, device=boxes.device) - 1, 0)
    threshold = float32_threshold(iou_threshold)
    sources, targets = [], []
    first = 0
    while first < n:  # chunks of rows, only to bound memory
        done = partners_cum[first - 1] if first > 0 else 0
        last = int(torch.searchsorted(partners_cum, done + _PAIR_CHUNK, right=True))
        last = min(max(last, first + 1), n)
        i, j = _pair_indices(ends, first, last)
        over = _pair_iou(boxes, i, j) > threshold
        sources.append(i[over])
        targets.append(j[over])
        first = last
    src, dst = torch.cat(sources), torch.cat(targets)
    while True:
        suppressed = torch.zeros(n, dtype=torch.bool, device=boxes.device)
        suppressed[dst[keep[src]]] = True
        if torch.equal(~suppressed, keep):
            return keep
        keep = ~suppressed


def _pair_indices(ends: Tensor, first: int, last: int) -> tuple[Tensor, Tensor]:
    rows = torch.arange(first, last, device=ends.device)
    partners = ends[first:last] - rows - 1
    i = torch.repeat_interleave(rows, partners)
    row_start = torch.cumsum(partners, 0) - partners
    rank = torch.arange(i.numel(), device=ends.device) - row_start.repeat_interleave(partners)
    return i, i + 1 + rank


def _pair_iou(boxes: Tensor, i: Tensor, j: Tensor) -> Tensor:
    """IoU of box pairs, with the same float ops (hence bits) as torchvision's nms kernel."""
    a, b = boxes[i], boxes[j]
    width = (torch.minimum(a[:, 2], b[:, 2]) - torch.maximum(a[:, 0], b[:, 0])).clamp_(min=0)
    inter = (torch.minimum(a[:, 3], b[:, 3]) - torch.maximum(a[:, 1], b[:, 1])).clamp_(min=0)
    inter.mul_(width)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter.div_(area_a.add_(area_b).sub_(inter))


@torch.library.custom_op(f"{NAMESPACE}::nms", mutates_args=())
def _nms_op(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    boxes, scores = _common_float(upcast_float32(boxes), upcast_float32(scores))
    return torch.ops.torchvision.nms(boxes, scores, iou_threshold)


@_nms_op.register_fake
def _(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    kept = torch.library.get_ctx().new_dynamic_size()
    return boxes.new_empty((kept,), dtype=torch.int64)


register_triton_cuda(_nms_op, "boxes_nms", "nms")


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Greedy NMS; same keep indices (sorted by score, ties by index) as torchvision.ops.nms."""
    _check_nms_args("nms", boxes, scores, iou_threshold)
    return _nms_op(boxes, scores, float(iou_threshold))


def _offset_boxes(boxes: Tensor, idxs: Tensor) -> Tensor:
    """torchvision's coordinate trick: shift each group so groups never overlap."""
    offsets = idxs.to(boxes) * (boxes.max() + torch.tensor(1).to(boxes))
    return boxes + offsets[:, None]


def _batched_nms_per_group(boxes: Tensor, scores: Tensor, idxs: Tensor, thr: float) -> Tensor:
    """torchvision's large-input path: its compiled NMS once per group, then sort by score.

    Measured against the vectorised pair path (``grouped_nms_keep``) on CPU, the compiled
    kernel's early exit wins by 5-15x when groups are large (RPN levels, few classes), and
    ties with it for many small groups; so the CPU keeps torchvision's algorithm exactly.
    """
    keep_mask = torch.zeros_like(scores, dtype=torch.bool)
    for group in torch.unique(idxs):
        members = torch.where(idxs == group)[0]
        keep_mask[members[torch.ops.torchvision.nms(boxes[members], scores[members], thr)]] = True
    keep = torch.where(keep_mask)[0]
    return keep[scores[keep].sort(descending=True)[1]]


@torch.library.custom_op(f"{NAMESPACE}::batched_nms", mutates_args=())
def _batched_nms_op(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    boxes, scores = _common_float(upcast_float32(boxes), upcast_float32(scores))
    if boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    if boxes.numel() <= _TORCHVISION_OFFSET_TRICK_MAX_NUMEL:
        return torch.ops.torchvision.nms(_offset_boxes(boxes, idxs), scores, iou_threshold)
    return _batched_nms_per_group(boxes, scores, idxs, iou_threshold)


@_batched_nms_op.register_fake
def _(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    kept = torch.library.get_ctx().new_dynamic_size()
    return boxes.new_empty((kept,), dtype=torch.int64)


register_triton_cuda(_batched_nms_op, "boxes_nms", "batched_nms")


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """NMS independently per value of ``idxs``; same result as torchvision.ops.batched_nms."""
    _check_nms_args("batched_nms", boxes, scores, iou_threshold)
    if idxs.shape != scores.shape:
        raise ValueError(f"batched_nms: idxs must be [N], got {tuple(idxs.shape)}")
    return _batched_nms_op(boxes, scores, idxs, float(iou_threshold))


def _rank_in_sorted(keys: Tensor) -> Tensor:
    """Position of each element inside its run of equal ``keys`` (``keys`` sorted)."""
    _, counts = torch.unique_consecutive(keys, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    return torch.arange(keys.numel(), device=keys.device) - starts.repeat_interleave(counts)


def _candidates(scores: Tensor, score_threshold: float, per_class_top_k: int | None):
    """(image, class, box, score) of every score above the threshold, in (image, class, box)
    order. With ``per_class_top_k`` only the k best of each (image, class) stay (SSD's rule;
    equal scores keep the lower box index)."""
    by_class = upcast_float32(scores).transpose(1, 2)  # [B, C, N]
    image, label, box = torch.nonzero(by_class > score_threshold, as_tuple=True)
    cand_scores = by_class[image, label, box]
    if per_class_top_k is not None:
        groups = image * by_class.shape[1] + label
        order = group_order(cand_scores, groups)
        best = order[_rank_in_sorted(groups[order]) < per_class_top_k]
        best = torch.sort(best).values
        image, label, box, cand_scores = image[best], label[best], box[best], cand_scores[best]
    return image, label, box, cand_scores


def _top_per_image(image: Tensor, scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Candidates (indices) that rank < k by score within their image, and their rank.

    Order of the result: (image, score descending, candidate index).
    """
    by_image = group_order(scores, image)
    rank = _rank_in_sorted(image[by_image])
    return by_image[rank < k], rank[rank < k]


def multiclass_select(
    boxes,
    scores,
    score_threshold,
    iou_threshold,
    max_detections,
    pre_nms_top_k,
    per_class_top_k,
    keep_fn,
):
    """Shared body of the CPU and CUDA paths; ``keep_fn`` is the grouped NMS kernel."""
    batch, _, num_classes = scores.shape
    image, label, box_idx, cand_scores = _candidates(scores, score_threshold, per_class_top_k)
    if pre_nms_top_k is not None:
        chosen, _ = _top_per_image(image, cand_scores, pre_nms_top_k)
        chosen = torch.sort(chosen).values  # back to candidate order for the ties
        image, label, box_idx, cand_scores = (
            t[chosen] for t in (image, label, box_idx, cand_scores)
        )
    cand_boxes = upcast_float32(
        boxes[image, box_idx] if boxes.dim() == 3 else boxes[image, box_idx, label]
    )
    groups = image * num_classes + label
    order = group_order(cand_scores, groups)
    kept = order[keep_fn(cand_boxes[order], groups[order], iou_threshold)]
    kept = torch.sort(kept).values
    final, rank = _top_per_image(image[kept], cand_scores[kept], max_detections)
    final = kept[final]
    out_boxes = cand_boxes.new_zeros((batch, max_detections, 4))
    out_scores = cand_scores.new_zeros((batch, max_detections))
    out_labels = torch.zeros((batch, max_detections), dtype=torch.int64, device=scores.device)
    out_boxes[image[final], rank] = cand_boxes[final]
    out_scores[image[final], rank] = cand_scores[final]
    out_labels[image[final], rank] = label[final]
    counts = torch.bincount(image[final], minlength=batch)
    return out_boxes, out_scores, out_labels, counts


@torch.library.custom_op(f"{NAMESPACE}::multiclass_nms", mutates_args=())
def _multiclass_nms_op(
    boxes: Tensor,
    scores: Tensor,
    score_threshold: float,
    iou_threshold: float,
    max_detections: int,
    pre_nms_top_k: int | None,
    per_class_top_k: int | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return multiclass_select(
        boxes,
        scores,
        score_threshold,
        iou_threshold,
        max_detections,
        pre_nms_top_k,
        per_class_top_k,
        grouped_nms_keep,
    )


@_multiclass_nms_op.register_fake
def _(
    boxes, scores, score_threshold, iou_threshold, max_detections, pre_nms_top_k, per_class_top_k
):
    batch = scores.shape[0]
    return (
        scores.new_empty((batch, max_detections, 4), dtype=torch.float32),
        scores.new_empty((batch, max_detections), dtype=torch.float32),
        scores.new_empty((batch, max_detections), dtype=torch.int64),
        scores.new_empty((batch,), dtype=torch.int64),
    )


register_triton_cuda(_multiclass_nms_op, "boxes_nms", "multiclass_nms")


def _check_multiclass_args(
    boxes, scores, iou_threshold, max_detections, pre_nms_top_k, per_class_top_k
) -> None:
    if scores.dim() != 3:
        raise ValueError(f"multiclass_nms: scores must be [B, N, C], got {tuple(scores.shape)}")
    batch, num_boxes, num_classes = scores.shape
    if tuple(boxes.shape) not in ((batch, num_boxes, 4), (batch, num_boxes, num_classes, 4)):
        raise ValueError(
            f"multiclass_nms: boxes must be [B, N, 4] or [B, N, C, 4] matching "
            f"scores {tuple(scores.shape)}, got {tuple(boxes.shape)}"
        )
    if not 0.0 <= iou_threshold <= 1.0:
        raise ValueError(f"multiclass_nms: iou_threshold must be in [0, 1], got {iou_threshold}")
    for name, value in (
        ("max_detections", max_detections),
        ("pre_nms_top_k", pre_nms_top_k),
        ("per_class_top_k", per_class_top_k),
    ):
        if value is not None and (int(value) != value or value < 0):
            raise ValueError(f"multiclass_nms: {name} must be a non-negative int, got {value}")


def multiclass_nms(
    boxes: Tensor,
    scores: Tensor,
    score_threshold: float,
    iou_threshold: float,
    max_detections: int,
    pre_nms_top_k: int | None = None,
    *,
    per_class_top_k: int | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Class-aware NMS over a whole batch, in one call, with fixed-shape padded outputs.

    Args:
        boxes: ``[B, N, 4]`` xyxy boxes shared by all classes, or ``[B, N, C, 4]`` per class.
        scores: ``[B, N, C]`` class scores (no background column).
        score_threshold: a (box, class) pair is a candidate when its score is ``>`` this.
        iou_threshold: greedy NMS per (image, class), suppressing IoU ``>`` this.
        max_detections: ``K``, detections kept per image (best scores first).
        pre_nms_top_k: keep only the k best candidates per image (over all classes) before NMS.
        per_class_top_k: keep only the k best candidates per (image, class) before NMS; this is
            torchvision SSD's ``topk_candidates`` rule (applied before ``pre_nms_top_k``).

    Returns:
        ``boxes [B, K, 4]`` float32, ``scores [B, K]`` float32, ``labels [B, K]`` int64 and
        ``num_detections [B]`` int64; rows past ``num_detections`` are zeros. Equal scores
        keep (class, box) order, as torchvision's SSD post-processing does.
    """
    _check_multiclass_args(
        boxes, scores, iou_threshold, max_detections, pre_nms_top_k, per_class_top_k
    )
    return _multiclass_nms_op(
        boxes,
        scores,
        float(score_threshold),
        float(iou_threshold),
        int(max_detections),
        pre_nms_top_k,
        per_class_top_k,
    )


def soft_nms(
    boxes: Tensor,
    scores: Tensor,
    sigma: float = 0.5,
    iou_threshold: float = 0.3,
    score_threshold: float = 0.001,
    method: str = "gaussian",
) -> tuple[Tensor, Tensor]:
    """Soft-NMS (Bodla et al. 2017): decay the scores of boxes overlapping a picked box.

    Repeatedly picks the highest current score (first index on ties), then multiplies every
    remaining score by ``exp(-iou**2 / sigma)`` (gaussian) or by ``1 - iou`` where
    ``iou >= iou_threshold`` (linear). Boxes whose score drops below ``score_threshold`` are
    discarded. Returns ``(keep, new_scores)`` sorted by new score, descending (the pick order).
    """
    _check_nms_args("soft_nms", boxes, scores, iou_threshold)
    if method not in ("gaussian", "linear"):
        raise ValueError(f"soft_nms: method must be 'gaussian' or 'linear', got {method!r}")
    if method == "gaussian" and sigma <= 0:
        raise ValueError(f"soft_nms: sigma must be > 0, got {sigma}")
    current = upcast_float32(scores).clone()
    iou = box_iou(boxes, boxes)
    alive = current >= score_threshold
    keep, kept_scores = [], []
    while bool(alive.any()):
        best = int(torch.where(alive, current, -math.inf).argmax())
        keep.append(best)
        kept_scores.append(current[best])
        alive[best] = False
        overlap = iou[best]
        if method == "gaussian":
            decay = torch.exp(-(overlap**2) / sigma)
        else:
            decay = torch.where(overlap >= iou_threshold, 1 - overlap, torch.ones_like(overlap))
        current = torch.where(alive, current * decay, current)
        alive &= current >= score_threshold
    keep_t = torch.tensor(keep, dtype=torch.int64, device=boxes.device)
    return keep_t, torch.stack(kept_scores) if kept_scores else current[:0]
