"""RoI Align on the CPU as weighted sums of feature rows: forward and backward.

The bilinear taps of RoI Align do not depend on the channel: each output bin reads
``4 * sampling_ratio**2`` feature cells with fixed weights. With the features seen as rows
``[N*H*W, C]`` (channels last), the forward pass is one weighted sum of rows per bin
(``embedding_bag``: multi-threaded and vectorised along the channels) and the backward pass
is the transposed sparse product ``S^T @ grad`` of the same taps. torchvision's CPU kernels
walk every (RoI, channel, bin, sample) in one thread instead: its forward was 29 ms for
Faster R-CNN's 300 RoIs of 256 channels at 7x7 bins (this one: about 5 ms, 2 cores), and its
backward about 40% of a MobileNetV3-FPN training step at 320 px (``tools/bench_roi.py``).

The taps follow torchvision's ``roi_align`` exactly (same sample positions, the same
out-of-range rule and edge clamping), so the results equal torchvision's up to float32
summation order. Only a fixed ``sampling_ratio > 0`` is handled here (torchvision's R-CNN
models use 2); the adaptive rule gives every RoI its own number of samples, which stays on
torchvision's kernels.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["roi_align_backward_sparse", "roi_align_forward_rows"]


def _axis_taps(coords: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """Bilinear taps along one axis as torchvision computes them, for sample coordinates
    ``coords [K, bins, samples]`` on an axis of ``size`` cells: cell indices and weights
    ``[K, bins, samples, 2]`` (low, high). A sample outside ``[-1, size]`` (or NaN) weighs 0
    and points at cell 0."""
    inside = ((coords >= -1.0) & (coords <= size))[..., None]
    coords = coords.clamp(min=0.0)
    low = coords.floor()  # coords >= 0, so floor is C's truncation
    at_edge = low >= size - 1
    low = torch.where(at_edge, size - 1, low)
    high = torch.where(at_edge, size - 1, low + 1)
    frac = torch.where(at_edge, 0.0, coords - low)
    index = torch.where(inside, torch.stack((low, high), -1).long(), 0)
    weight = torch.where(inside, torch.stack((1.0 - frac, frac), -1), 0.0)
    return index, weight


def _sample_coords(start: Tensor, length: Tensor, bins: int, sampling_ratio: int) -> Tensor:
    """``[K, bins, sampling_ratio]`` sample positions, in torchvision's order of operations."""
    bin_size = (length / bins)[:, None, None]
    bin_index = torch.arange(bins, dtype=start.dtype, device=start.device)[None, :, None]
    sample = torch.arange(sampling_ratio, dtype=start.dtype, device=start.device)
    offset = (sample + 0.5)[None, None, :] * bin_size / sampling_ratio
    return start[:, None, None] + bin_index * bin_size + offset


def _bilinear_taps(
    rois: Tensor,
    spatial_scale: float,
    pooled_height: int,
    pooled_width: int,
    height: int,
    width: int,
    sampling_ratio: int,
    aligned: bool,
) -> tuple[Tensor, Tensor]:
    """The taps of every output bin: feature rows ``[K*ph*pw, 4*sr*sr]`` (indices into the
    ``[N*H*W]`` cells) and their weights, the average over the bin's samples included."""
    offset = 0.5 if aligned else 0.0
    x1, y1, x2, y2 = (rois[:, i] * spatial_scale - offset for i in range(1, 5))
    roi_w, roi_h = x2 - x1, y2 - y1
    if not aligned:  # the legacy version makes every RoI at least 1x1
        roi_w, roi_h = roi_w.clamp(min=1.0), roi_h.clamp(min=1.0)
    sr = sampling_ratio
    y_index, y_weight = _axis_taps(_sample_coords(y1, roi_h, pooled_height, sr), height)
    x_index, x_weight = _axis_taps(_sample_coords(x1, roi_w, pooled_width, sr), width)
    # An outer sum (product) of each RoI's y taps [ph * sr * 2] and x taps [pw * sr * 2]: one
    # broadcast with long rows (a 7-d broadcast of the same values was 5x slower), then the
    # bins' axes brought together: [K, ph, pw, (sr_y, 2_y), (sr_x, 2_x)].
    num_rois = rois.shape[0]
    image_offset = (rois[:, 0].long() * (height * width)).view(-1, 1, 1)
    rows = (image_offset + y_index.view(num_rois, -1, 1) * width) + x_index.view(num_rois, 1, -1)
    weights = y_weight.view(num_rois, -1, 1) * x_weight.view(num_rois, 1, -1) / (sr * sr)
    shape = (num_rois, pooled_height, 2 * sr, pooled_width, 2 * sr)
    bins = num_rois * pooled_height * pooled_width
    rows = rows.view(shape).transpose(2, 3).reshape(bins, -1)
    weights = weights.view(shape).transpose(2, 3).reshape(bins, -1)
    return rows, weights


def _check_sampling_ratio(sampling_ratio: int) -> None:
    if sampling_ratio <= 0:
        raise ValueError("the CPU RoI Align of detkit.ops.roi_cpu needs a fixed sampling_ratio > 0")


def roi_align_forward_rows(
    input: Tensor,
    rois: Tensor,
    spatial_scale: float,
    pooled_height: int,
    pooled_width: int,
    sampling_ratio: int,
    aligned: bool,
) -> Tensor:
    """``roi_align`` of ``input [N, C, H, W]`` as weighted sums of its channel rows,
    ``[K, C, ph, pw]``; the arguments of ``torchvision::roi_align`` (``sampling_ratio`` > 0)."""
    _check_sampling_ratio(sampling_ratio)
    batch_size, channels, height, width = input.shape
    if rois.shape[0] == 0 or input.numel() == 0:
        return input.new_zeros((rois.shape[0], channels, pooled_height, pooled_width))
    rois = rois.to(input.dtype)
    # Rows of channels, contiguous (a strided view makes every gathered row a strided read).
    features = input.permute(0, 2, 3, 1).contiguous().view(batch_size * height * width, channels)
    bins = pooled_height * pooled_width
    out = input.new_empty((rois.shape[0], channels, bins))
    # A few dozen RoIs at a time, so that each chunk's sums are still in the cache when they
    # are transposed into the output: 2.6 instead of 11 ms for 300 RoIs of 256 x 7 x 7. The
    # taps are built for many RoIs at once (their small ops cost per call), but in bounded
    # blocks: 12 bytes per tap, 9.4 KB per RoI at 7 x 7 bins and 2 x 2 samples.
    per_chunk = max(1, _CHUNK_VALUES // (bins * channels))
    per_block = per_chunk * max(1, _BLOCK_ROIS // per_chunk)
    for block in range(0, rois.shape[0], per_block):
        rows, weights = _bilinear_taps(
            rois[block : block + per_block], spatial_scale, pooled_height, pooled_width,
            height, width, sampling_ratio, aligned,
        )  # fmt: skip
        for first in range(0, rows.shape[0] // bins, per_chunk):
            taps = slice(first * bins, (first + per_chunk) * bins)
            sums = F.embedding_bag(
                rows[taps], features, per_sample_weights=weights[taps], mode="sum"
            )
            start = block + first
            out[start : start + per_chunk].copy_(sums.view(-1, bins, channels).transpose(1, 2))
    return out.view(-1, channels, pooled_height, pooled_width)


# Output values per chunk of the forward pass (1.6 MB of float32), RoIs per block of taps.
_CHUNK_VALUES = 400_000
_BLOCK_ROIS = 2048


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
    _check_sampling_ratio(sampling_ratio)
    num_rois = rois.shape[0]
    if num_rois == 0 or batch_size * height * width == 0:
        return grad.new_zeros((batch_size, channels, height, width))
    rows, weights = _bilinear_taps(
        rois.to(grad.dtype), spatial_scale, pooled_height, pooled_width, height, width,
        sampling_ratio, aligned,
    )  # fmt: skip
    bins, taps_per_bin = rows.shape
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
        taps = torch.sparse_csr_tensor(
            torch.arange(bins + 1, device=grad.device) * taps_per_bin,
            rows.reshape(-1),
            weights.reshape(-1),
            (bins, batch_size * height * width),
            check_invariants=False,  # valid by construction: in-range columns
        )
    grad_bins = grad.permute(0, 2, 3, 1).reshape(bins, channels)
    grad_input = taps.t() @ grad_bins  # [N*H*W, C]
    return grad_input.view(batch_size, height, width, channels).permute(0, 3, 1, 2).contiguous()
