"""Triton kernels for RoI Align and RoI Pool, forward and backward.

One program handles one RoI, a block of channels and a block of output bins: the per-RoI
geometry (start, bin size, sampling grid) is scalar, so the sampling loops have scalar bounds
while the bins and channels are vector lanes. The arithmetic follows torchvision's CPU kernels
step by step, in the compute type (float64 for float64 inputs, float32 otherwise), so forward
results match them bit for bit. Backward kernels scatter with atomic adds into a float32/float64
buffer (no half-precision atomics, less rounding), cast to the input dtype at the end.

``roi_align_forward``/``roi_pool_forward`` and the ``*_backward`` launchers take the arguments
of ``torchvision::roi_align``/``roi_pool``/``_roi_align_backward``/``_roi_pool_backward``;
``roi_align``/``roi_pool`` take the arguments of the public ``detkit.ops`` functions.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = [
    "roi_align",
    "roi_align_backward",
    "roi_align_forward",
    "roi_pool",
    "roi_pool_backward",
    "roi_pool_forward",
]

_MAX_BLOCK_P = 256  # output bins per program; more would spill registers on a GPU
_BLOCK_ELEMENTS = 2048  # channels x bins per program


@triton.jit
def _roi_geometry(rois_ptr, k, SPATIAL_SCALE: tl.constexpr, OFFSET: tl.constexpr, acc_t):
    """Batch index and scaled (x1, y1, x2, y2) of RoI ``k``, in ``acc_t`` like torchvision's
    kernels (which take the scale as the compute type, so float32 inputs use float32(scale))."""
    roi = rois_ptr + k * 5
    batch = tl.load(roi).to(tl.int32)  # C++ int conversion truncates toward zero
    x1 = tl.load(roi + 1).to(acc_t) * SPATIAL_SCALE - OFFSET
    y1 = tl.load(roi + 2).to(acc_t) * SPATIAL_SCALE - OFFSET
    x2 = tl.load(roi + 3).to(acc_t) * SPATIAL_SCALE - OFFSET
    y2 = tl.load(roi + 4).to(acc_t) * SPATIAL_SCALE - OFFSET
    return batch, x1, y1, x2, y2


@triton.jit
def _align_grid(
    k, rois_ptr, PH, PW, SAMPLING, SPATIAL_SCALE: tl.constexpr, ALIGNED: tl.constexpr, acc_t
):
    """RoI Align geometry: batch, start, bin size and sampling grid of RoI ``k``."""
    batch, x1, y1, x2, y2 = _roi_geometry(
        rois_ptr, k, SPATIAL_SCALE, 0.5 if ALIGNED else 0.0, acc_t
    )
    roi_w = x2 - x1
    roi_h = y2 - y1
    if not ALIGNED:  # the legacy version forces RoIs to be at least 1x1
        roi_w = tl.maximum(roi_w, 1.0)
        roi_h = tl.maximum(roi_h, 1.0)
    bin_h = roi_h / PH
    bin_w = roi_w / PW
    grid_h = tl.where(SAMPLING > 0, SAMPLING, tl.ceil(roi_h / PH).to(tl.int32))
    grid_w = tl.where(SAMPLING > 0, SAMPLING, tl.ceil(roi_w / PW).to(tl.int32))
    return batch, x1, y1, bin_h, bin_w, grid_h, grid_w


@triton.jit
def _bilinear(y, x, H, W, acc_t):
    """torchvision's bilinear_interpolate: corner indices, weights and in-range mask."""
    inside = (y >= -1.0) & (y <= H) & (x >= -1.0) & (x <= W)
    y = tl.maximum(y, 0.0)
    x = tl.maximum(x, 0.0)
    y_low = y.to(tl.int32)
    x_low = x.to(tl.int32)
    y_edge = y_low >= H - 1
    x_edge = x_low >= W - 1
    y_high = tl.where(y_edge, H - 1, y_low + 1)
    x_high = tl.where(x_edge, W - 1, x_low + 1)
    y_low = tl.where(y_edge, H - 1, y_low)
    x_low = tl.where(x_edge, W - 1, x_low)
    y = tl.where(y_edge, y_low.to(acc_t), y)
    x = tl.where(x_edge, x_low.to(acc_t), x)
    ly = y - y_low.to(acc_t)
    lx = x - x_low.to(acc_t)
    hy = 1.0 - ly
    hx = 1.0 - lx
    return y_low, y_high, x_low, x_high, hy * hx, hy * lx, ly * hx, ly * lx, inside


@triton.jit
def _roi_align_kernel(
    src_ptr,
    rois_ptr,
    dst_ptr,
    N,
    C,
    H,
    W,
    PH,
    PW,
    SAMPLING,
    SPATIAL_SCALE: tl.constexpr,
    ALIGNED: tl.constexpr,
    IS_F64: tl.constexpr,
    BACKWARD: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """Forward: src = input, dst = output. Backward: src = output gradient, dst = input
    gradient, each sample scattering grad * weight / count to its four corners."""
    acc_t = tl.float64 if IS_F64 else tl.float32
    k = tl.program_id(0)
    chan = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    bins = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    batch, x1, y1, bin_h, bin_w, grid_h, grid_w = _align_grid(
        k, rois_ptr, PH, PW, SAMPLING, SPATIAL_SCALE, ALIGNED, acc_t
    )
    ph = (bins // PW).to(acc_t)
    pw = (bins % PW).to(acc_t)
    out_mask = (chan[:, None] < C) & (bins[None, :] < PH * PW)
    out_offs = (k * C + chan).to(tl.int64)[:, None] * PH * PW + bins[None, :]
    lane_ok = out_mask & (batch >= 0) & (batch < N)
    plane = ((batch * C + chan).to(tl.int64) * H * W)[:, None]
    count = tl.maximum(grid_h * grid_w, 1).to(acc_t)
    if BACKWARD:
        grad = tl.load(src_ptr + out_offs, mask=out_mask, other=0.0).to(acc_t)
    else:
        acc = tl.zeros((BLOCK_C, BLOCK_P), dtype=acc_t)
    for iy in range(0, grid_h):
        y = y1 + ph * bin_h + ((iy + 0.5) * bin_h) / grid_h.to(acc_t)
        for ix in range(0, grid_w):
            x = x1 + pw * bin_w + ((ix + 0.5) * bin_w) / grid_w.to(acc_t)
            y_lo, y_hi, x_lo, x_hi, w1, w2, w3, w4, inside = _bilinear(y, x, H, W, acc_t)
            m = lane_ok & inside[None, :]
            i1 = plane + (y_lo * W + x_lo)[None, :]
            i2 = plane + (y_lo * W + x_hi)[None, :]
            i3 = plane + (y_hi * W + x_lo)[None, :]
            i4 = plane + (y_hi * W + x_hi)[None, :]
            if BACKWARD:
                tl.atomic_add(dst_ptr + i1, grad * w1[None, :] / count, mask=m)
                tl.atomic_add(dst_ptr + i2, grad * w2[None, :] / count, mask=m)
                tl.atomic_add(dst_ptr + i3, grad * w3[None, :] / count, mask=m)
                tl.atomic_add(dst_ptr + i4, grad * w4[None, :] / count, mask=m)
            else:
                v1 = tl.load(src_ptr + i1, mask=m, other=0.0).to(acc_t)
                v2 = tl.load(src_ptr + i2, mask=m, other=0.0).to(acc_t)
                v3 = tl.load(src_ptr + i3, mask=m, other=0.0).to(acc_t)
                v4 = tl.load(src_ptr + i4, mask=m, other=0.0).to(acc_t)
                acc += w1[None, :] * v1 + w2[None, :] * v2 + w3[None, :] * v3 + w4[None, :] * v4
    if not BACKWARD:
        tl.store(dst_ptr + out_offs, (acc / count).to(dst_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _round_half_away(v):
    """C's round(): halves go away from zero (tl.floor(v + 0.5) would not for negatives)."""
    return tl.where(v >= 0, tl.floor(v + 0.5), -tl.floor(-v + 0.5))


@triton.jit
def _roi_pool_fwd_kernel(
    inp_ptr,
    rois_ptr,
    out_ptr,
    argmax_ptr,
    N,
    C,
    H,
    W,
    PH,
    PW,
    SPATIAL_SCALE: tl.constexpr,
    IS_F64: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    acc_t = tl.float64 if IS_F64 else tl.float32
    k = tl.program_id(0)
    chan = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    bins = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    batch, x1, y1, x2, y2 = _roi_geometry(rois_ptr, k, SPATIAL_SCALE, 0.0, acc_t)
    start_w = _round_half_away(x1).to(tl.int32)
    start_h = _round_half_away(y1).to(tl.int32)
    roi_w = tl.maximum(_round_half_away(x2).to(tl.int32) - start_w + 1, 1)
    roi_h = tl.maximum(_round_half_away(y2).to(tl.int32) - start_h + 1, 1)
    bin_h = roi_h.to(acc_t) / PH
    bin_w = roi_w.to(acc_t) / PW
    ph = (bins // PW).to(acc_t)
    pw = (bins % PW).to(acc_t)
    h0 = tl.minimum(tl.maximum(tl.floor(ph * bin_h).to(tl.int32) + start_h, 0), H)
    h1 = tl.minimum(tl.maximum(tl.ceil((ph + 1) * bin_h).to(tl.int32) + start_h, 0), H)
    w0 = tl.minimum(tl.maximum(tl.floor(pw * bin_w).to(tl.int32) + start_w, 0), W)
    w1 = tl.minimum(tl.maximum(tl.ceil((pw + 1) * bin_w).to(tl.int32) + start_w, 0), W)
    empty = (h1 <= h0) | (w1 <= w0)
    out_mask = (chan[:, None] < C) & (bins[None, :] < PH * PW)
    lane_ok = out_mask & (batch >= 0) & (batch < N)
    plane = ((batch * C + chan).to(tl.int64) * H * W)[:, None]
    best = tl.where(empty, 0.0, -3.4028234663852886e38).to(acc_t)
    best = tl.zeros((BLOCK_C, BLOCK_P), dtype=acc_t) + best[None, :]
    best_idx = tl.full((BLOCK_C, BLOCK_P), -1, dtype=tl.int32)
    # A bin spans at most ceil(bin size) + 1 rows/columns; lanes mask the rest. Rows outer,
    # columns inner and a strict ">" keep torchvision's first-maximum argmax on ties.
    for dh in range(0, tl.ceil(bin_h).to(tl.int32) + 1):
        h = h0 + dh
        for dw in range(0, tl.ceil(bin_w).to(tl.int32) + 1):
            w = w0 + dw
            idx = h * W + w
            m = lane_ok & ((h < h1) & (w < w1))[None, :]
            v = tl.load(inp_ptr + plane + idx[None, :], mask=m, other=0.0).to(acc_t)
            take = m & (v > best)
            best = tl.where(take, v, best)
            best_idx = tl.where(take, idx[None, :], best_idx)
    out_offs = (k * C + chan).to(tl.int64)[:, None] * PH * PW + bins[None, :]
    # idle lanes still hold -FLT_MAX, which would overflow a float16 cast
    best = tl.where(lane_ok, best, 0.0)
    tl.store(out_ptr + out_offs, best.to(out_ptr.dtype.element_ty), mask=out_mask)
    tl.store(argmax_ptr + out_offs, best_idx, mask=out_mask)


@triton.jit
def _roi_pool_bwd_kernel(
    grad_ptr,
    rois_ptr,
    argmax_ptr,
    gin_ptr,
    N,
    C,
    H,
    W,
    P,
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    k = tl.program_id(0)
    chan = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    bins = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    batch = tl.load(rois_ptr + k * 5).to(tl.int32)
    out_mask = (chan[:, None] < C) & (bins[None, :] < P)
    offs = (k * C + chan).to(tl.int64)[:, None] * P + bins[None, :]
    grad = tl.load(grad_ptr + offs, mask=out_mask, other=0.0)
    idx = tl.load(argmax_ptr + offs, mask=out_mask, other=-1)
    m = out_mask & (idx >= 0) & (batch >= 0) & (batch < N)
    plane = ((batch * C + chan).to(tl.int64) * H * W)[:, None]
    tl.atomic_add(gin_ptr + plane + idx, grad.to(gin_ptr.dtype.element_ty), mask=m)


def _blocks(num_rois: int, channels: int, bins: int) -> tuple[tuple[int, int, int], int, int]:
    """Launch grid and (BLOCK_C, BLOCK_P) for ``num_rois`` x ``channels`` x ``bins`` outputs."""
    block_p = min(triton.next_power_of_2(max(bins, 1)), _MAX_BLOCK_P)
    block_c = max(1, min(triton.next_power_of_2(max(channels, 1)), _BLOCK_ELEMENTS // block_p))
    grid = (num_rois, triton.cdiv(channels, block_c), triton.cdiv(bins, block_p))
    return grid, block_c, block_p


def _grad_buffer(grad: Tensor, shape: tuple[int, int, int, int]) -> Tensor:
    """Zeroed input-gradient accumulator: float64 for float64, float32 otherwise."""
    return grad.new_zeros(
        shape, dtype=torch.float64 if grad.dtype == torch.float64 else torch.float32
    )


def _align_launch(src, rois, dst, shape, params, backward: bool) -> None:
    """Run the RoI Align kernel; ``shape`` is the input's (N, C, H, W), ``params`` the op's
    (spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned)."""
    spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned = params
    grid, block_c, block_p = _blocks(rois.shape[0], shape[1], pooled_height * pooled_width)
    _roi_align_kernel[grid](
        src.contiguous(), rois.contiguous(), dst, *shape, pooled_height, pooled_width,
        sampling_ratio, SPATIAL_SCALE=float(spatial_scale), ALIGNED=bool(aligned),
        IS_F64=src.dtype == torch.float64, BACKWARD=backward, BLOCK_C=block_c, BLOCK_P=block_p,
    )  # fmt: skip


def roi_align_forward(
    input: Tensor,
    rois: Tensor,
    spatial_scale: float,
    pooled_height: int,
    pooled_width: int,
    sampling_ratio: int,
    aligned: bool,
) -> Tensor:
    """RoI Align forward, arguments of ``torchvision::roi_align``; returns ``[K, C, PH, PW]``."""
    out = input.new_empty((rois.shape[0], input.shape[1], pooled_height, pooled_width))
    if out.numel() > 0:
        params = (spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned)
        _align_launch(input, rois, out, tuple(input.shape), params, backward=False)
    return out


def roi_align_backward(
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
    """Gradient of RoI Align w.r.t. its input, arguments of ``torchvision::_roi_align_backward``."""
    shape = (batch_size, channels, height, width)
    acc = _grad_buffer(grad, shape)
    if grad.numel() > 0 and acc.numel() > 0:
        params = (spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned)
        _align_launch(grad.to(acc.dtype), rois, acc, shape, params, backward=True)
    return acc.to(grad.dtype)


def roi_pool_forward(
    input: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int, pooled_width: int
) -> tuple[Tensor, Tensor]:
    """RoI max pooling, arguments of ``torchvision::roi_pool``; returns (output, argmax int32)."""
    n, c, h, w = input.shape
    out = input.new_empty((rois.shape[0], c, pooled_height, pooled_width))
    argmax = torch.empty(out.shape, dtype=torch.int32, device=input.device)
    if out.numel() > 0:
        grid, block_c, block_p = _blocks(rois.shape[0], c, pooled_height * pooled_width)
        _roi_pool_fwd_kernel[grid](
            input.contiguous(), rois.contiguous(), out, argmax, n, c, h, w, pooled_height,
            pooled_width, SPATIAL_SCALE=float(spatial_scale),
            IS_F64=input.dtype == torch.float64, BLOCK_C=block_c, BLOCK_P=block_p,
        )  # fmt: skip
    return out, argmax


def roi_pool_backward(
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
    """Gradient of RoI Pool: each output's gradient goes to its argmax input element."""
    acc = _grad_buffer(grad, (batch_size, channels, height, width))
    if grad.numel() > 0 and acc.numel() > 0:
        bins = pooled_height * pooled_width
        grid, block_c, block_p = _blocks(rois.shape[0], channels, bins)
        _roi_pool_bwd_kernel[grid](
            grad.contiguous(), rois.contiguous(), argmax.contiguous(), acc, batch_size,
            channels, height, width, bins, BLOCK_C=block_c, BLOCK_P=block_p,
        )  # fmt: skip
    return acc.to(grad.dtype)


def roi_align(
    input: Tensor,
    boxes: Tensor | list[Tensor],
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
) -> Tensor:
    """:func:`detkit.ops.roi_align` computed directly by the Triton kernel (no autograd)."""
    from detkit.ops.roi import as_output_size, as_rois

    pooled_h, pooled_w = as_output_size(output_size)
    rois = as_rois(boxes, input)
    return roi_align_forward(
        input, rois, spatial_scale, pooled_h, pooled_w, sampling_ratio, aligned
    )


def roi_pool(
    input: Tensor,
    boxes: Tensor | list[Tensor],
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
) -> Tensor:
    """:func:`detkit.ops.roi_pool` computed directly by the Triton kernel (no autograd)."""
    from detkit.ops.roi import as_output_size, as_rois

    pooled_h, pooled_w = as_output_size(output_size)
    return roi_pool_forward(input, as_rois(boxes, input), spatial_scale, pooled_h, pooled_w)[0]
