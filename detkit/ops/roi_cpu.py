"""RoI Align's backward pass on the CPU as one sparse matrix product.

torchvision's CPU ``_roi_align_backward`` walks every (RoI, channel, bin, sample) in a single
thread and scatters four bilinear weights at a time; in Faster R-CNN training it is the
largest single cost (about 40% of a MobileNetV3-FPN step at 320 px). The bilinear taps do not
depend on the channel, so they form a sparse matrix ``S [K*ph*pw, N*H*W]`` with
``4 * sampling_ratio**2`` entries per output bin, and the gradient of the features is
``S^T @ grad`` with the channels as the dense dimension: one multi-threaded sparse product
instead of ``C`` passes over the taps (``tools/bench_roi.py``: several times faster).

The taps follow torchvision's ``roi_align`` exactly (same sample positions, the same
out-of-range rule and edge clamping), so the result equals torchvision's up to float32
summation order. Only a fixed ``sampling_ratio > 0`` is handled here (torchvision's R-CNN
models use 2); the adaptive rule gives every RoI its own number of samples, which stays on
torchvision's kernel.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

__all__ = ["roi_align_backward_sparse"]


def _axis_taps(coords: Tensor, size: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Bilinear taps along one axis as torchvision computes them: ``(low, high, weight_low,
    weight_high, inside)`` for sample coordinates ``coords`` on an axis of ``size`` cells."""
    inside = (coords >= -1.0) & (coords <= size)
    coords = coords.clamp(min=0.0)
    low = coords.floor().long()  # coords >= 0, so floor is C's truncation
    at_edge = low >= size - 1
    low = torch.where(at_edge, size - 1, low)
    high = torch.where(at_edge, size - 1, low + 1)
    frac = torch.where(at_edge, 0.0, coords - low.to(coords.dtype))
    return low, high, 1.0 - frac, frac, inside


def _sample_coords(start: Tensor, length: Tensor, bins: int, sampling_ratio: int) -> Tensor:
    """``[K, bins, sampling_ratio]`` sample positions, in torchvision's order of operations."""
    bin_size = (length / bins)[:, None, None]
    bin_index = torch.arange(bins, dtype=start.dtype, device=start.device)[None, :, None]
    sample = torch.arange(sampling_ratio, dtype=start.dtype, device=start.device)
    offset = (sample + 0.5)[None, None, :] * bin_size / sampling_ratio
    return start[:, None, None] + bin_index * bin_size + offset


def roi_align_backward_sparse(
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
    """Gradient of ``roi_align`` w.r.t. its input, ``[N, C, H, W]``; the arguments of
    ``torchvision::_roi_align_backward`` (``sampling_ratio`` must be > 0)."""
    if sampling_ratio <= 0:
        raise ValueError("roi_align_backward_sparse needs a fixed sampling_ratio > 0")
    num_rois, ph, pw, sr = rois.shape[0], pooled_height, pooled_width, sampling_ratio
    if num_rois == 0:
        return grad.new_zeros((batch_size, channels, height, width))
    rois = rois.to(grad.dtype)
    offset = 0.5 if aligned else 0.0
    x1, y1, x2, y2 = (rois[:, i] * spatial_scale - offset for i in range(1, 5))
    roi_w, roi_h = x2 - x1, y2 - y1
    if not aligned:  # the legacy version makes every RoI at least 1x1
        roi_w, roi_h = roi_w.clamp(min=1.0), roi_h.clamp(min=1.0)
    y_low, y_high, wy_low, wy_high, y_in = _axis_taps(_sample_coords(y1, roi_h, ph, sr), height)
    x_low, x_high, wx_low, wx_high, x_in = _axis_taps(_sample_coords(x1, roi_w, pw, sr), width)

    # Broadcast y terms [K, ph, sr] against x terms [K, pw, sr] to [K, ph, pw, sr_y, sr_x].
    def along_y(t: Tensor) -> Tensor:
        return t[:, :, None, :, None]

    def along_x(t: Tensor) -> Tensor:
        return t[:, None, :, None, :]

    image_offset = (rois[:, 0].long() * (height * width))[:, None, None, None, None]
    inside = along_y(y_in) & along_x(x_in)
    columns, weights = [], []
    for y_index, y_weight in ((y_low, wy_low), (y_high, wy_high)):
        for x_index, x_weight in ((x_low, wx_low), (x_high, wx_high)):
            columns.append(image_offset + along_y(y_index) * width + along_x(x_index))
            tap = along_y(y_weight) * along_x(x_weight) / (sr * sr)
            weights.append(torch.where(inside, tap, 0.0))
    bins = num_rois * ph * pw
    taps_per_bin = 4 * sr * sr
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
        taps = torch.sparse_csr_tensor(
            torch.arange(bins + 1, device=grad.device) * taps_per_bin,
            torch.stack(columns, -1).reshape(-1),
            torch.stack(weights, -1).reshape(-1),
            (bins, batch_size * height * width),
            check_invariants=False,  # valid by construction: sorted rows, in-range columns
        )
    grad_bins = grad.permute(0, 2, 3, 1).reshape(bins, channels)
    grad_input = taps.t() @ grad_bins  # [N*H*W, C]
    return grad_input.view(batch_size, height, width, channels).permute(0, 3, 1, 2).contiguous()
