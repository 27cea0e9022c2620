"""RoI Align (Mask R-CNN) and RoI Pool (Fast R-CNN) as ``torch.library`` custom ops.

``roi_align``/``roi_pool`` take the arguments of ``torchvision.ops`` and give its results. They
call the custom ops ``detkit::roi_align`` and ``detkit::roi_pool`` (schemas of
``torchvision::roi_align``/``roi_pool``; ``roi_pool`` also returns the int32 argmax its
backward needs), whose backward passes are the ops ``detkit::_roi_align_backward`` and
``detkit::_roi_pool_backward``. Paths:

- CPU (and any device without a Triton kernel): torchvision's compiled kernels, except RoI
  Align with a fixed ``sampling_ratio`` on the CPU, whose forward is a weighted sum of feature
  rows per bin and whose backward one sparse matrix product (:mod:`detkit.ops.roi_cpu`, equal
  up to float32 summation order). float16 and bfloat16 are computed in float32 and cast back
  (torchvision's CPU kernels compute float16 in float16 and reject bfloat16).
- CUDA: the Triton kernels of :mod:`detkit.ops.kernels.roi`, when triton is installed.
- Fake impls for ``torch.compile(fullgraph=True)``/``torch.export``; autograd through
  ``torch.library.register_autograd``; ONNX translations in :data:`ROI_ONNX_TRANSLATIONS`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torchvision  # noqa: F401  (registers the torchvision:: kernels the CPU path calls)
from torch import Tensor

from detkit.ops._library import (
    NAMESPACE,
    eager_cpu,
    have_triton,
    register_triton_cuda,
    upcast_float32,
)
from detkit.ops.roi_cpu import roi_align_backward_sparse, roi_align_forward_rows

__all__ = ["ROI_ONNX_TRANSLATIONS", "as_output_size", "as_rois", "roi_align", "roi_pool"]


def as_rois(boxes: Tensor | Sequence[Tensor], input: Tensor) -> Tensor:
    """``boxes`` as a ``[K, 5]`` (batch_index, x1, y1, x2, y2) tensor, validated.

    Accepts a ``[K, 5]`` tensor or a list of per-image ``[L, 4]`` tensors (torchvision's forms).
    """
    if isinstance(boxes, (list, tuple)):
        for i, b in enumerate(boxes):
            if not isinstance(b, Tensor) or b.dim() != 2 or b.shape[1] != 4:
                shape = tuple(b.shape) if isinstance(b, Tensor) else type(b).__name__
                raise ValueError(f"roi ops: boxes[{i}] must be a Tensor[L, 4], got {shape}")
        if not boxes:
            return input.new_zeros((0, 5))
        ids = [torch.full_like(b[:, :1], i) for i, b in enumerate(boxes)]
        rois = torch.cat([torch.cat(ids), torch.cat(list(boxes))], dim=1)
    elif isinstance(boxes, Tensor):
        if boxes.dim() != 2 or boxes.shape[1] != 5:
            raise ValueError(
                f"roi ops: boxes must be a Tensor[K, 5] (batch_index, x1, y1, x2, y2) or a list "
                f"of Tensor[L, 4], got a tensor of shape {tuple(boxes.shape)}"
            )
        rois = boxes
    else:
        raise ValueError(
            f"roi ops: boxes must be a Tensor[K, 5] or a list of Tensor[L, 4], got {type(boxes)}"
        )
    if rois.device != input.device:
        raise ValueError(f"roi ops: boxes are on {rois.device} but input is on {input.device}")
    _check_batch_index(rois, input.shape[0])
    return rois


def _check_batch_index(rois: Tensor, batch_size: int) -> None:
    """Every RoI's batch index is one of ``input``'s images. torchvision's CPU kernels read
    outside the features otherwise, and a NaN index wraps to any row. Checked on CPU tensors
    outside graph capture (a data-dependent check cannot be traced; on a GPU it would wait)."""
    if not eager_cpu(rois) or rois.shape[0] == 0:
        return
    index = rois[:, 0]
    bad = ~((index >= 0) & (index < batch_size) & (index == index.floor()))
    if bad.any():
        k = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"roi ops: boxes[{k}] has batch index {index[k].item()}, not one of the input's "
            f"{batch_size} images (0..{batch_size - 1})"
        )


def as_output_size(output_size: int | Sequence[int]) -> tuple[int, int]:
    """``output_size`` (int or (height, width)) as a pair of positive ints."""
    size = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
    if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
        raise ValueError(f"roi ops: output_size must be a positive int or (h, w), got {size}")
    return size


def _check_input(name: str, input: Tensor) -> None:
    if not isinstance(input, Tensor) or input.dim() != 4:
        shape = tuple(input.shape) if isinstance(input, Tensor) else type(input).__name__
        raise ValueError(f"{name}: input must be a Tensor[N, C, H, W], got {shape}")


# ---------------------------------------------------------------- roi_align


@torch.library.custom_op(f"{NAMESPACE}::roi_align", mutates_args=())
def _roi_align_op(
    input: Tensor,
    rois: Tensor,
    spatial_scale: float,
    pooled_height: int,
    pooled_width: int,
    sampling_ratio: int,
    aligned: bool,
) -> Tensor:
    x = upcast_float32(input)
    forward = torch.ops.torchvision.roi_align
    if x.device.type == "cpu" and sampling_ratio > 0:
        forward = roi_align_forward_rows  # the same values, several times faster
    out = forward(
        x, rois.to(x.dtype), spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned
    )
    return out.to(input.dtype)


@_roi_align_op.register_fake
def _(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned):
    return input.new_empty((rois.shape[0], input.shape[1], pooled_height, pooled_width))


@torch.library.custom_op(f"{NAMESPACE}::_roi_align_backward", mutates_args=())
def _roi_align_backward_op(
    grad: Tensor,
    rois: Tensor,
    spatial_scale: float,
    pooled_height: int,
    pooled_width: int,
    batch_size: int,
    channels: int,
    height: int,
    width: int,
    sampling_ratio: int,
    aligned: bool,
) -> Tensor:
    g = upcast_float32(grad)
    backward = torch.ops.torchvision._roi_align_backward
    if g.device.type == "cpu" and sampling_ratio > 0:
        backward = roi_align_backward_sparse  # the same gradient, several times faster
    grad_input = backward(
        g,
        rois.to(g.dtype),
        spatial_scale,
        pooled_height,
        pooled_width,
        batch_size,
        channels,
        height,
        width,
        sampling_ratio,
        aligned,
    )
    return grad_input.to(grad.dtype)


@_roi_align_backward_op.register_fake
def _(
    grad,
    rois,
    spatial_scale,
    pooled_height,
    pooled_width,
    batch_size,
    channels,
    height,
    width,
    sampling_ratio,
    aligned,
):
    return grad.new_empty((batch_size, channels, height, width))


def _roi_align_setup(ctx, inputs, output) -> None:
    input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned = inputs
    ctx.save_for_backward(rois)
    ctx.input_shape = input.shape
    ctx.params = (spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned)


def _roi_align_grad(ctx, grad):
    (rois,) = ctx.saved_tensors
    spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned = ctx.params
    batch_size, channels, height, width = ctx.input_shape
    grad_input = _roi_align_backward_op(
        grad,
        rois,
        spatial_scale,
        pooled_height,
        pooled_width,
        batch_size,
        channels,
        height,
        width,
        sampling_ratio,
        aligned,
    )
    return grad_input, None, None, None, None, None, None


_roi_align_op.register_autograd(_roi_align_grad, setup_context=_roi_align_setup)


def roi_align(
    input: Tensor,
    boxes: Tensor | list[Tensor],
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
) -> Tensor:
    """RoI Align with average pooling (Mask R-CNN), same arguments and results as torchvision's.

    Args:
        input: features ``[N, C, H, W]``.
        boxes: ``[K, 5]`` (batch_index, x1, y1, x2, y2) or a list of per-image ``[L, 4]``
            ``xyxy`` boxes, in the coordinates of the image the features come from.
        output_size: bins per RoI, int or (height, width).
        spatial_scale: maps box coordinates to feature coordinates (e.g. 1/16).
        sampling_ratio: sampling points per bin side; <= 0 means ``ceil(roi_size / bins)``.
        aligned: shift boxes by -0.5 pixel (Detectron2); False is the legacy version.

    Returns:
        ``[K, C, output_size[0], output_size[1]]`` in the dtype of ``input``.
    """
    _check_input("roi_align", input)
    pooled_height, pooled_width = as_output_size(output_size)
    rois = as_rois(boxes, input)
    return _roi_align_op(
        input,
        rois,
        float(spatial_scale),
        pooled_height,
        pooled_width,
        int(sampling_ratio),
        bool(aligned),
    )


# ---------------------------------------------------------------- roi_pool


@torch.library.custom_op(f"{NAMESPACE}::roi_pool", mutates_args=())
def _roi_pool_op(
    input: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int, pooled_width: int
) -> tuple[Tensor, Tensor]:
    x = upcast_float32(input)
    out, argmax = torch.ops.torchvision.roi_pool(
        x, rois.to(x.dtype), spatial_scale, pooled_height, pooled_width
    )
    return out.to(input.dtype), argmax


@_roi_pool_op.register_fake
def _(input, rois, spatial_scale, pooled_height, pooled_width):
    shape = (rois.shape[0], input.shape[1], pooled_height, pooled_width)
    return input.new_empty(shape), input.new_empty(shape, dtype=torch.int32)


@torch.library.custom_op(f"{NAMESPACE}::_roi_pool_backward", mutates_args=())
def _roi_pool_backward_op(
    grad: Tensor,
    rois: Tensor,
    argmax: Tensor,
    spatial_scale: float,
    pooled_height: int,
    pooled_width: int,
    batch_size: int,
    channels: int,
    height: int,
    width: int,
) -> Tensor:
    g = upcast_float32(grad)
    grad_input = torch.ops.torchvision._roi_pool_backward(
        g,
        rois.to(g.dtype),
        argmax,
        spatial_scale,
        pooled_height,
        pooled_width,
        batch_size,
        channels,
        height,
        width,
    )
    return grad_input.to(grad.dtype)


@_roi_pool_backward_op.register_fake
def _(
    grad,
    rois,
    argmax,
    spatial_scale,
    pooled_height,
    pooled_width,
    batch_size,
    channels,
    height,
    width,
):
    return grad.new_empty((batch_size, channels, height, width))


def _roi_pool_setup(ctx, inputs, output) -> None:
    input, rois, spatial_scale, pooled_height, pooled_width = inputs
    argmax = output[1]  # which input element each output came from: the backward's routing
    ctx.mark_non_differentiable(argmax)
    ctx.save_for_backward(rois, argmax)
    ctx.input_shape = input.shape
    ctx.params = (spatial_scale, pooled_height, pooled_width)


def _roi_pool_grad(ctx, grad, _grad_argmax):
    rois, argmax = ctx.saved_tensors
    spatial_scale, pooled_height, pooled_width = ctx.params
    batch_size, channels, height, width = ctx.input_shape
    grad_input = _roi_pool_backward_op(
        grad,
        rois,
        argmax,
        spatial_scale,
        pooled_height,
        pooled_width,
        batch_size,
        channels,
        height,
        width,
    )
    return grad_input, None, None, None, None


_roi_pool_op.register_autograd(_roi_pool_grad, setup_context=_roi_pool_setup)


def roi_pool(
    input: Tensor,
    boxes: Tensor | list[Tensor],
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
) -> Tensor:
    """RoI max pooling (Fast R-CNN), same arguments and results as ``torchvision.ops.roi_pool``.

    Box corners are scaled by ``spatial_scale`` and rounded; each RoI is split into
    ``output_size`` bins and each output is the maximum of its bin (0 for an empty bin).
    ``boxes``: ``[K, 5]`` (batch_index, x1, y1, x2, y2) or a list of per-image ``[L, 4]``.
    Returns ``[K, C, output_size[0], output_size[1]]`` in the dtype of ``input``.
    """
    _check_input("roi_pool", input)
    pooled_height, pooled_width = as_output_size(output_size)
    rois = as_rois(boxes, input)
    return _roi_pool_op(input, rois, float(spatial_scale), pooled_height, pooled_width)[0]


if have_triton():
    register_triton_cuda(_roi_align_op, "roi", "roi_align_forward")
    register_triton_cuda(_roi_align_backward_op, "roi", "roi_align_backward")
    register_triton_cuda(_roi_pool_op, "roi", "roi_pool_forward")
    register_triton_cuda(_roi_pool_backward_op, "roi", "roi_pool_backward")


# ---------------------------------------------------------------- ONNX
# Traced onnxscript functions (plain Python run at export time, so Python branches on the
# attributes are fine); onnxscript is imported only when exporting.


def _roi_align_onnx(
    input,
    rois,
    spatial_scale: float,
    pooled_height: int,
    pooled_width: int,
    sampling_ratio: int,
    aligned: bool,
):
    """detkit::roi_align -> ONNX RoiAlign (opset >= 16 for coordinate_transformation_mode)."""
    from onnxscript import INT64
    from onnxscript import opset18 as op

    batch_indices = op.Cast(op.Squeeze(op.Slice(rois, [0], [1], [1]), [1]), to=INT64.dtype)
    boxes = op.CastLike(op.Slice(rois, [1], [5], [1]), input)
    return op.RoiAlign(
        input,
        boxes,
        batch_indices,
        # half_pixel shifts by -0.5 like aligned=True; output_half_pixel is the legacy mode,
        # and (like torchvision) it also clamps RoIs to at least 1x1.
        coordinate_transformation_mode="half_pixel" if aligned else "output_half_pixel",
        mode="avg",
        output_height=pooled_height,
        output_width=pooled_width,
        sampling_ratio=max(sampling_ratio, 0),  # ONNX spells "adaptive" as 0
        spatial_scale=spatial_scale,
    )


def _roi_pool_onnx(input, rois, spatial_scale: float, pooled_height: int, pooled_width: int):
    """detkit::roi_pool -> ONNX MaxRoiPool (rounded corners, max per bin, like torchvision).

    MaxRoiPool has no argmax output: the second output (used only by the backward pass) is
    exported as -1s and is dropped from graphs that only use the pooled values.
    """
    from onnxscript import INT32
    from onnxscript import opset18 as op

    pooled = op.MaxRoiPool(
        input,
        op.CastLike(rois, input),
        pooled_shape=[pooled_height, pooled_width],
        spatial_scale=spatial_scale,
    )
    argmax = op.Cast(op.Expand(op.Constant(value_int=-1), op.Shape(pooled)), to=INT32.dtype)
    return pooled, argmax


ROI_ONNX_TRANSLATIONS = {
    torch.ops.detkit.roi_align.default: _roi_align_onnx,
    torch.ops.detkit.roi_pool.default: _roi_pool_onnx,
}
"""ONNX translations of the roi custom ops for ``torch.onnx.export(..., dynamo=True,
custom_translation_table=...)``."""
