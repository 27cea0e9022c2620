"""ONNX translations of detkit's custom ops for the default (dynamo) ``torch.onnx.export``.

Use::

    torch.onnx.export(model, args, dynamo=True,
                      custom_translation_table=detkit.ops._onnx.custom_translation_table())

The table maps ``torch.ops.detkit.<op>.default`` to onnxscript functions traced at export time
(Python branches on attributes are fine; onnxscript is imported only when exporting):

- ``nms`` / ``batched_nms`` -> ``NonMaxSuppression`` (batched: torchvision's offset trick).
- ``multiclass_nms`` -> masks for the optional top-k rules, one ``NonMaxSuppression`` over
  ``[B, C, N]`` scores (class-specific boxes ``[B, N, C, 4]``: over ``B * C`` single-class
  batches), then a per-image ``TopK`` with ``k = min(K, selected)`` (never fails with fewer
  candidates) and ``Pad`` to the fixed ``[B, K]`` outputs.
- ``box_iou`` -> element-wise ops.
- ``roi_align`` / ``roi_pool`` from :data:`detkit.ops.roi.ROI_ONNX_TRANSLATIONS`.

ONNX Runtime orders equal scores by its own rules, so ties may come out in another order than
in eager mode; distinct scores give the same detections.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

import detkit.ops.boxes  # noqa: F401 - registers torch.ops.detkit.box_iou
import detkit.ops.nms  # noqa: F401 - registers torch.ops.detkit.nms & co.

_INT64_MAX_BOXES = 2**31 - 1


def _nms_onnx(boxes, scores, iou_threshold: float):
    """detkit::nms -> NonMaxSuppression over one batch and one class; keep the box column."""
    from onnxscript import FLOAT
    from onnxscript import opset18 as op

    boxes = op.Unsqueeze(op.Cast(boxes, to=FLOAT.dtype), [0])
    scores = op.Unsqueeze(op.Cast(scores, to=FLOAT.dtype), [0, 1])
    selected = op.NonMaxSuppression(
        boxes,
        scores,
        op.Constant(value_int=_INT64_MAX_BOXES),
        op.Constant(value_float=iou_threshold),
    )
    return op.Squeeze(op.Slice(selected, [2], [3], [1]), [1])


def _batched_nms_onnx(boxes, scores, idxs, iou_threshold: float):
    """detkit::batched_nms -> offset trick (as torchvision) + NonMaxSuppression."""
    from onnxscript import FLOAT
    from onnxscript import opset18 as op

    boxes = op.Cast(boxes, to=FLOAT.dtype)
    offsets = op.Mul(op.Cast(idxs, to=FLOAT.dtype), op.Add(op.ReduceMax(boxes, keepdims=0), 1.0))
    return _nms_onnx(op.Add(boxes, op.Unsqueeze(offsets, [1])), scores, iou_threshold)


def _box_iou_onnx(boxes1, boxes2):
    """detkit::box_iou -> element-wise IoU of ``[N, 4] x [M, 4]`` (same ops as eager)."""
    from onnxscript import FLOAT
    from onnxscript import opset18 as op

    a = op.Unsqueeze(op.Cast(boxes1, to=FLOAT.dtype), [-2])  # [..., N, 1, 4]
    b = op.Unsqueeze(op.Cast(boxes2, to=FLOAT.dtype), [-3])  # [..., 1, M, 4]

    def coord(t, i):
        return op.Squeeze(op.Slice(t, [i], [i + 1], [-1]), [-1])

    width = op.Max(op.Sub(op.Min(coord(a, 2), coord(b, 2)), op.Max(coord(a, 0), coord(b, 0))), 0.0)
    height = op.Max(op.Sub(op.Min(coord(a, 3), coord(b, 3)), op.Max(coord(a, 1), coord(b, 1))), 0.0)
    inter = op.Mul(height, width)
    area_a = op.Mul(op.Sub(coord(a, 2), coord(a, 0)), op.Sub(coord(a, 3), coord(a, 1)))
    area_b = op.Mul(op.Sub(coord(b, 2), coord(b, 0)), op.Sub(coord(b, 3), coord(b, 1)))
    return op.Div(inter, op.Sub(op.Add(area_a, area_b), inter))


def _keep_top_k(op, scores, k: int, axis: int):
    """Scores outside the k best along ``axis`` set to -inf (k clipped to the axis length)."""
    length = op.Shape(scores, start=axis, end=axis + 1) if axis >= 0 else op.Shape(scores)
    k_eff = op.Min(op.Constant(value_ints=[k]), length)
    values, indices = op.TopK(scores, k_eff, axis=axis)
    floor = op.Expand(op.Constant(value_float=float("-inf")), op.Shape(scores))
    return op.ScatterElements(floor, indices, values, axis=axis)


def _multiclass_nms_onnx(
    boxes,
    scores,
    score_threshold: float,
    iou_threshold: float,
    max_detections: int,
    pre_nms_top_k: int | None,
    per_class_top_k: int | None,
):
    """detkit::multiclass_nms -> NonMaxSuppression + per-image TopK into padded outputs."""
    from onnxscript import FLOAT, INT64
    from onnxscript import opset18 as op

    class_specific = len(boxes.shape) == 4  # [B, N, C, 4]: every class has its own boxes
    boxes = op.Cast(boxes, to=FLOAT.dtype)
    by_class = op.Transpose(op.Cast(scores, to=FLOAT.dtype), perm=[0, 2, 1])  # [B, C, N]
    masked = op.Where(op.Greater(by_class, score_threshold), by_class, float("-inf"))
    if per_class_top_k is not None:
        masked = _keep_top_k(op, masked, per_class_top_k, axis=2)
    if pre_nms_top_k is not None:
        flat = op.Reshape(masked, [0, -1])
        masked = op.Reshape(_keep_top_k(op, flat, pre_nms_top_k, axis=1), op.Shape(masked))
    if class_specific:
        selected, sel_boxes = _nms_class_specific(op, boxes, masked, iou_threshold, score_threshold)
    else:
        selected = op.NonMaxSuppression(
            boxes,
            masked,
            op.Constant(value_int=_INT64_MAX_BOXES),
            op.Constant(value_float=iou_threshold),
            op.Constant(value_float=score_threshold),
        )  # [S, 3] rows (image, class, box)
        sel_boxes = op.GatherND(
            boxes,
            op.Concat(op.Slice(selected, [0], [1], [1]), op.Slice(selected, [2], [3], [1]), axis=1),
        )
    image = op.Squeeze(op.Slice(selected, [0], [1], [1]), [1])
    sel_scores = op.GatherND(by_class, selected)
    labels = op.Squeeze(op.Slice(selected, [1], [2], [1]), [1])
    # Dense [B, S] score table (-inf outside the image) so one TopK ranks every image.
    images = op.Range(0, op.Squeeze(op.Shape(scores, start=0, end=1), [0]), 1)
    mine = op.Equal(op.Unsqueeze(images, [1]), op.Unsqueeze(image, [0]))
    table = op.Where(mine, op.Unsqueeze(sel_scores, [0]), float("-inf"))
    k_eff = op.Min(op.Constant(value_ints=[max_detections]), op.Shape(selected, start=0, end=1))
    top_scores, top_idx = op.TopK(table, k_eff, axis=1)
    valid = op.Greater(top_scores, float("-inf"))
    pad = op.Sub(op.Constant(value_ints=[max_detections]), k_eff)
    zeros2 = op.Constant(value_ints=[0, 0, 0])
    out_scores = op.Pad(op.Where(valid, top_scores, 0.0), op.Concat(zeros2, pad, axis=0))
    out_labels = op.Pad(
        op.Where(valid, op.Gather(labels, top_idx), op.Constant(value_int=0)),
        op.Concat(zeros2, pad, axis=0),
    )
    box_rows = op.Where(op.Unsqueeze(valid, [2]), op.Gather(sel_boxes, top_idx), 0.0)
    out_boxes = op.Pad(
        box_rows,
        op.Concat(op.Constant(value_ints=[0, 0, 0, 0]), pad, op.Constant(value_ints=[0]), axis=0),
    )
    counts = op.ReduceSum(op.Cast(valid, to=INT64.dtype), [1], keepdims=0)
    return out_boxes, out_scores, out_labels, counts


def _nms_class_specific(op, boxes, masked, iou_threshold: float, score_threshold: float):
    """NonMaxSuppression when every class has its own boxes ``[B, N, C, 4]``: each (image,
    class) pair becomes one "batch" of the op with its own boxes and a single class. Returns
    the selected ``[S, 3]`` rows (image, class, box) and their boxes ``[S, 4]``."""
    from onnxscript import INT64

    n = op.Shape(boxes, start=1, end=2)
    pair_shape = op.Concat(op.Constant(value_ints=[-1]), n, op.Constant(value_ints=[4]), axis=0)
    per_pair = op.Reshape(op.Transpose(boxes, perm=[0, 2, 1, 3]), pair_shape)  # [B*C, N, 4]
    scores = op.Reshape(masked, op.Concat(op.Constant(value_ints=[-1, 1]), n, axis=0))
    picked = op.NonMaxSuppression(
        per_pair,
        scores,
        op.Constant(value_int=_INT64_MAX_BOXES),
        op.Constant(value_float=iou_threshold),
        op.Constant(value_float=score_threshold),
    )  # [S, 3] rows (image * C + class, 0, box)
    pair = op.Slice(picked, [0], [1], [1])
    box = op.Slice(picked, [2], [3], [1])
    classes = op.Cast(op.Shape(masked, start=1, end=2), to=INT64.dtype)
    selected = op.Concat(op.Div(pair, classes), op.Mod(pair, classes), box, axis=1)
    return selected, op.GatherND(per_pair, op.Concat(pair, box, axis=1))


def custom_translation_table() -> dict[Callable, Callable]:
    """Translations of every detkit custom op, for ``torch.onnx.export(dynamo=True)``."""
    table: dict[Callable, Callable] = {
        torch.ops.detkit.box_iou.default: _box_iou_onnx,
        torch.ops.detkit.nms.default: _nms_onnx,
        torch.ops.detkit.batched_nms.default: _batched_nms_onnx,
        torch.ops.detkit.multiclass_nms.default: _multiclass_nms_onnx,
    }
    try:
        from detkit.ops.roi import ROI_ONNX_TRANSLATIONS
    except ImportError:  # roi ops are optional for exporting box/NMS graphs
        ROI_ONNX_TRANSLATIONS = {}
    table.update(ROI_ONNX_TRANSLATIONS)
    return table
