"""Merging parallel convolutions, for inference.

A CPU convolution costs tens of microseconds a call however small (oneDNN's fixed cost), and a
small detector's branches are many small convolutions: the anchor-free YOLO head runs a box
and a classification branch over each level's map, a CSP block a main and a bypass 1x1 over
its input. Convolutions that read the same input are one convolution with their output
channels stacked; convolutions that read consecutive channel slices of one map are one
grouped convolution (equal shapes) or, for 1x1 kernels, one block-diagonal product. The
modules that own such branches build the merged form in ``merge_parallel_convs()`` (after
folding: a BatchNorm between a convolution and its activation would have to be merged too).
"""

from __future__ import annotations

import torch
from torch import nn

from detkit.models.pointwise import Pointwise


def new_inference_conv(
    like: nn.Conv2d, cls: type, in_channels: int, out_channels: int, groups: int
):
    """An inference-only convolution of class ``cls`` with ``like``'s geometry, with a bias."""
    conv = cls(
        in_channels,
        out_channels,
        like.kernel_size,
        stride=like.stride,
        padding=like.padding,
        dilation=like.dilation,
        groups=groups,
        bias=True,
        padding_mode=like.padding_mode,
        device=like.weight.device,
        dtype=like.weight.dtype,
    )
    conv.requires_grad_(False)
    return conv


def with_layout(weight: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``weight`` in the memory layout of ``like`` (a channels_last model stays so)."""
    channels_last = like.is_contiguous(memory_format=torch.channels_last) and not (
        like.is_contiguous()
    )
    return weight.contiguous(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format
    )


def _geometry(conv: nn.Conv2d) -> tuple:
    return (conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.padding_mode)


def _bias(conv: nn.Conv2d) -> torch.Tensor:
    return conv.bias if conv.bias is not None else conv.weight.new_zeros(conv.out_channels)


@torch.no_grad()
def stacked_convs(convs: list[nn.Conv2d]) -> nn.Conv2d | None:
    """One convolution computing ``torch.cat([conv(x) for conv in convs], 1)``: the
    convolutions read the same input with the same geometry. None if they do not."""
    first = convs[0]
    if any(
        type(c) is not type(first)
        or _geometry(c) != _geometry(first)
        or (c.in_channels, c.groups) != (first.in_channels, first.groups)
        for c in convs
    ):
        return None
    out = sum(c.out_channels for c in convs)
    merged = new_inference_conv(first, type(first), first.in_channels, out, first.groups)
    merged.weight.copy_(torch.cat([c.weight for c in convs]))
    merged.weight.data = with_layout(merged.weight.data, first.weight)
    merged.bias.copy_(torch.cat([_bias(c) for c in convs]))
    return merged


@torch.no_grad()
def side_by_side_convs(convs: list[nn.Conv2d]) -> nn.Conv2d | None:
    """One convolution computing ``torch.cat([conv(x_i) ...], 1)`` where ``x_i`` are
    consecutive channel slices of one input, conv ``i`` reading slice ``i``: a grouped
    convolution when the convolutions have equal shapes, a block-diagonal 1x1 (zeros between
    the blocks: a few more multiplies, one call) for 1x1 kernels of any widths. None
    otherwise (or for convolutions that are grouped themselves)."""
    first = convs[0]
    if any(_geometry(c) != _geometry(first) or c.groups != 1 for c in convs):
        return None
    ins, outs = [c.in_channels for c in convs], [c.out_channels for c in convs]
    if len(set(ins)) == 1 and len(set(outs)) == 1:
        merged = new_inference_conv(first, nn.Conv2d, sum(ins), sum(outs), len(convs))
        merged.weight.copy_(torch.cat([c.weight for c in convs]))
    elif first.kernel_size == (1, 1) and first.stride == (1, 1) and first.padding == (0, 0):
        merged = new_inference_conv(first, Pointwise, sum(ins), sum(outs), 1)
        merged.weight.zero_()
        row = col = 0
        for conv in convs:
            merged.weight[row : row + conv.out_channels, col : col + conv.in_channels] = conv.weight
            row, col = row + conv.out_channels, col + conv.in_channels
    else:
        return None
    merged.weight.data = with_layout(merged.weight.data, first.weight)
    merged.bias.copy_(torch.cat([_bias(c) for c in convs]))
    return merged


def merge_parallel_convs(model: nn.Module) -> int:
    """Merge the parallel convolutions of every module of ``model`` that knows how (a
    ``merge_parallel_convs()`` method returning how many merges it made), in place; returns
    how many. Inference only, after :func:`fuse_conv_bn`; the same function up to float
    rounding."""
    if model.training:
        raise ValueError("merge_parallel_convs: call model.eval() first")
    return sum(
        module.merge_parallel_convs()
        for module in list(model.modules())
        if callable(getattr(module, "merge_parallel_convs", None))
    )
