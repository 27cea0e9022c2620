"""Non-maximum suppression: ``nms``, ``batched_nms``, ``multiclass_nms`` and ``soft_nms``.

``nms``, ``batched_nms`` and ``multiclass_nms`` are ``torch.library`` custom ops
(``detkit::nms``, ``detkit::batched_nms``, ``detkit::multiclass_nms``) with fake impls (data
dependent sizes via ``new_dynamic_size``) and Triton CUDA paths in
:mod:`detkit.ops.kernels.boxes_nms`. ``multiclass_nms``'s CPU engine is in
:mod:`detkit.ops.nms_multiclass` and :mod:`detkit.ops.nms_grouped`, with a dense table for
few candidates in :mod:`detkit.ops.nms_dense`.

The NMS rule, the same for every dtype, every op and every device (CPU, Triton):

- **Compute type.** Boxes and scores are promoted together: float64 if either is float64,
  else float32. float16, bfloat16 and integer inputs are upcast to float32, so NMS and IoU
  never run below float32, autocast or not; float64 is never lowered.
- **IoU** is computed in the compute type with torchvision's operations in torchvision's
  order (``inter / (area_a + area_b - inter)``), so it has the same bits as torchvision's.
  The Triton kernels use correctly rounded division and no fused multiply-add for this.
- **Threshold.** Box ``j`` is suppressed when ``IoU > iou_threshold``, the threshold taken
  exactly as the double it is, as torchvision's kernels compare: a float32 IoU is compared
  with the largest float32 not above it (:func:`~detkit.ops.nms_grouped.float32_threshold`,
  the same decisions; the nearest float32, e.g. of 0.6, would keep an IoU of
  ``float32(0.6)``), a float64 IoU with the threshold itself (never rounded to float32).
- **Greedy.** Boxes are visited by score, descending (equal scores: lower index first;
  ``multiclass_nms``: lower box index); a box is removed only by a box that was kept. A box
  suppressed itself suppresses nothing (unlike Fast-NMS, which keeps only A of a chain
  A > B > C where A removes B, B overlaps C and A does not: greedy keeps A and C).

So ``nms`` and ``batched_nms`` return torchvision's keep indices on the promoted inputs, and
``multiclass_nms`` keeps what ``torchvision.ops.nms`` keeps in each (image, class) group.
(torchvision's ``batched_nms`` below 1000 boxes shifts each class by an offset before one
NMS, which can move an IoU by an ulp; our ``batched_nms`` does the same to stay equal to it,
``multiclass_nms`` never shifts.) ``soft_nms``'s linear rule compares its IoU with the
threshold exactly too. Scores are compared with ``score_threshold`` as the tensor op
``scores > score_threshold`` does, as in torchvision's detectors.
"""

from __future__ import annotations

import math

import torch
import torchvision  # noqa: F401 - registers torch.ops.torchvision
from torch import Tensor

from detkit.ops._library import NAMESPACE, eager_cpu, register_triton_cuda, upcast_float32
from detkit.ops.boxes import box_iou
from detkit.ops.nms_grouped import promote
from detkit.ops.nms_multiclass import cpu_select

# torchvision's CPU batched_nms switches from the offset trick to a per-class loop here.
_TORCHVISION_OFFSET_TRICK_MAX_NUMEL = 4000


def _check_nms_args(name: str, boxes: Tensor, scores: Tensor, iou_threshold: float) -> None:
    if boxes.dim() != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"{name}: boxes must be [N, 4], got {tuple(boxes.shape)}")
    if scores.shape != boxes.shape[:1]:
        raise ValueError(f"{name}: scores must be [N] matching boxes, got {tuple(scores.shape)}")
    if not 0.0 <= iou_threshold <= 1.0 or math.isnan(iou_threshold):
        raise ValueError(f"{name}: iou_threshold must be in [0, 1], got {iou_threshold}")


def _nms_cpu(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    boxes, scores = promote(boxes, scores)
    return torch.ops.torchvision.nms(boxes, scores, iou_threshold)


@torch.library.custom_op(f"{NAMESPACE}::nms", mutates_args=())
def _nms_op(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    return _nms_cpu(boxes, scores, iou_threshold)


@_nms_op.register_fake
def _(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    kept = torch.library.get_ctx().new_dynamic_size()
    return boxes.new_empty((kept,), dtype=torch.int64)


register_triton_cuda(_nms_op, "boxes_nms", "nms")


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Greedy NMS; same keep indices (sorted by score, ties by index) as torchvision.ops.nms."""
    _check_nms_args("nms", boxes, scores, iou_threshold)
    if eager_cpu(boxes, scores):
        return _nms_cpu(boxes, scores, float(iou_threshold))
    return _nms_op(boxes, scores, float(iou_threshold))


def _offset_boxes(boxes: Tensor, idxs: Tensor) -> Tensor:
    """torchvision's coordinate trick: shift each group so groups never overlap.

    ``max + 1`` adds in the boxes' dtype exactly as torchvision's ``max + tensor(1).to(boxes)``
    does (the same offsets bit for bit) without building a tensor per call (10 us of 700 at
    500 boxes here)."""
    offsets = idxs.to(boxes) * (boxes.max() + 1)
    return boxes + offsets[:, None]


def _batched_nms_per_group(boxes: Tensor, scores: Tensor, idxs: Tensor, thr: float) -> Tensor:
    """torchvision's large-input path: its compiled NMS once per group, then sort by score.

    Measured against an all-pairs vectorised path on CPU, the compiled kernel's early exit
    won by 5-15x when groups are large (RPN levels, few classes) and tied for many small
    groups; and this is exactly torchvision's algorithm, which ``batched_nms`` must equal.
    """
    keep_mask = torch.zeros_like(scores, dtype=torch.bool)
    for group in torch.unique(idxs):
        members = torch.where(idxs == group)[0]
        keep_mask[members[torch.ops.torchvision.nms(boxes[members], scores[members], thr)]] = True
    keep = torch.where(keep_mask)[0]
    return keep[scores[keep].sort(descending=True)[1]]


@torch.library.custom_op(f"{NAMESPACE}::batched_nms", mutates_args=())
def _batched_nms_op(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    return _batched_nms_cpu(boxes, scores, idxs, iou_threshold)


def _batched_nms_cpu(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    boxes, scores = promote(boxes, scores)
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
    if eager_cpu(boxes, scores, idxs):
        return _batched_nms_cpu(boxes, scores, idxs, float(iou_threshold))
    return _batched_nms_op(boxes, scores, idxs, float(iou_threshold))


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
    return cpu_select(
        boxes, scores, score_threshold, iou_threshold, max_detections, pre_nms_top_k,
        per_class_top_k,
    )  # fmt: skip


@_multiclass_nms_op.register_fake
def _(
    boxes, scores, score_threshold, iou_threshold, max_detections, pre_nms_top_k, per_class_top_k
):
    batch = scores.shape[0]
    dtype = promote(boxes[:0], scores[:0])[0].dtype
    return (
        scores.new_empty((batch, max_detections, 4), dtype=dtype),
        scores.new_empty((batch, max_detections), dtype=dtype),
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
        ``boxes [B, K, 4]`` and ``scores [B, K]`` in the compute type (float32; float64 when
        boxes or scores are float64), ``labels [B, K]`` int64 and
        ``num_detections [B]`` int64; rows past ``num_detections`` are zeros. Equal scores
        keep (class, box) order, as torchvision's SSD post-processing does; at a top-k
        cut-off equal scores go to the lower box (per class) or (class, box) (per image).

    No density cliff: the CPU engine (:mod:`detkit.ops.nms_multiclass`) sizes the IoU work
    of each of its exact methods before doing any and takes the cheapest, so sparse and
    dense scores, with or without per-class top-k, stay ahead of a per-image torchvision
    loop (tools/bench_ops.py measures 1%, 5% and 40% of the pairs above the threshold).
    Up to a few hundred candidates (a trained model, a few images) one dense IoU table
    replaces it (:mod:`detkit.ops.nms_dense`); one image of a small model is still faster
    with a single ``torchvision.ops.batched_nms`` (0.19 against 0.39 ms in the bench).
    """
    _check_multiclass_args(
        boxes, scores, iou_threshold, max_detections, pre_nms_top_k, per_class_top_k
    )
    args = (float(score_threshold), float(iou_threshold), int(max_detections))
    if eager_cpu(boxes, scores):
        # Selection is not differentiable (the op has no autograd formula either): detached,
        # a predict_padded run with autograd on reads its candidates' values without a warning.
        boxes, scores = boxes.detach(), scores.detach()
        return cpu_select(boxes, scores, *args, pre_nms_top_k, per_class_top_k)
    return _multiclass_nms_op(boxes, scores, *args, pre_nms_top_k, per_class_top_k)


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
            # In float64, the threshold is compared exactly (the rule in the module docstring).
            over = overlap.double() >= iou_threshold
            decay = torch.where(over, 1 - overlap, torch.ones_like(overlap))
        current = torch.where(alive, current * decay, current)
        alive &= current >= score_threshold
    keep_t = torch.tensor(keep, dtype=torch.int64, device=boxes.device)
    return keep_t, torch.stack(kept_scores) if kept_scores else current[:0]
