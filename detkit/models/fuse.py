"""Folding BatchNorm into the convolution before it, and merging parallel convolutions, for
inference (:func:`fuse_for_inference` does both; ``detkit predict`` runs it).

In eval mode a BatchNorm is an affine map per channel, so ``bn(conv(x))`` is one convolution
with rescaled weights and a bias. On a CPU the separate BatchNorm pass was about a sixth of
the digits detectors' inference time (measured with the profiler: 17% for the digits YOLO),
which folding removes. The folded model computes the same function up to float rounding
(a few ulps), not bit for bit, so ``detkit eval`` leaves it off by default (its numbers
equal the validation that chose the checkpoint) and ``detkit predict`` turns it on.
"""

from __future__ import annotations

import functools
import itertools

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from detkit.models.pointwise import Pointwise

# The convolutions folded into: their constructor is nn.Conv2d's.
_CONVS = (nn.Conv2d, Pointwise)


def _batch_norm_stats(bn: nn.Module) -> tuple | None:
    """``(running_mean, running_var, eps, weight, bias)`` of an eval-mode BatchNorm2d or a
    torchvision FrozenBatchNorm2d; None for anything else (or a BatchNorm without running
    statistics, which normalises with the batch's own even in eval mode)."""
    from torchvision.ops import FrozenBatchNorm2d

    if isinstance(bn, nn.BatchNorm2d):
        if bn.training or bn.running_mean is None or bn.running_var is None:
            return None
        return bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias
    if isinstance(bn, FrozenBatchNorm2d):
        return bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias
    return None


def _new_conv(like: nn.Conv2d, cls: type, in_channels: int, out_channels: int, groups: int):
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


def _with_layout(weight: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``weight`` in the memory layout of ``like`` (a channels_last model stays so)."""
    channels_last = like.is_contiguous(memory_format=torch.channels_last) and not (
        like.is_contiguous()
    )
    return weight.contiguous(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format
    )


def _folded(conv: nn.Conv2d, stats: tuple) -> nn.Conv2d:
    """A copy of ``conv`` (of its class) with the BatchNorm ``stats`` folded into its weight
    and bias."""
    fused = _new_conv(conv, type(conv), conv.in_channels, conv.out_channels, conv.groups)
    weight, bias = fuse_conv_bn_weights(conv.weight, conv.bias, *stats)
    fused.weight = nn.Parameter(_with_layout(weight.detach(), conv.weight), False)
    fused.bias = nn.Parameter(bias.detach(), False)
    return fused


# torchvision ResNet blocks: each convN feeds bnN directly (their forward is fixed).
_BLOCK_PAIRS = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))


@functools.cache
def _known_forwards() -> tuple[frozenset, frozenset]:
    """The ``forward`` functions of containers that run their children in order, and of
    torchvision's ResNet blocks (imported on first use: torchvision's models are heavy)."""
    from torchvision.models.resnet import BasicBlock, Bottleneck

    from detkit.models.backbones.rcnn_backbones import LayerGetter

    in_order = frozenset((nn.Sequential.forward, LayerGetter.forward))
    return in_order, frozenset((BasicBlock.forward, Bottleneck.forward))


def _conv_bn_pairs(module: nn.Module) -> list[tuple[str, str]]:
    """Names of the (convolution, BatchNorm) children of ``module`` where the BatchNorm reads
    the convolution's output directly: consecutive children of a container that runs its
    children in order, and the fixed pairs of torchvision's ResNet blocks. Other modules'
    forward may use their children in any order, so they give none (a subclass that
    overrides ``forward`` included)."""
    in_order, resnet_blocks = _known_forwards()
    forward = type(module).forward
    if forward in in_order:
        return list(itertools.pairwise(name for name, _ in module.named_children()))
    if forward in resnet_blocks:
        return [pair for pair in _BLOCK_PAIRS if hasattr(module, pair[1])]
    return []


def fuse_conv_bn(model: nn.Module) -> int:
    """Fold every BatchNorm that directly follows a convolution into that convolution (the
    BatchNorm becomes ``nn.Identity``), in place; returns how many.

    Only for inference: ``model`` must be in eval mode (training would update statistics
    that no longer exist). "Directly follows" is known for containers that run their
    children in order (``nn.Sequential``: detkit's ``conv_bn_relu``, ``ConvBNAct``,
    torchvision's ``Conv2dNormActivation``; the ResNet trunk's ``LayerGetter``) and for
    torchvision's ResNet blocks (``convN`` -> ``bnN``); BatchNorms reached otherwise are left
    as they are.
    """
    if model.training:
        raise ValueError("fuse_conv_bn: call model.eval() first (it folds running statistics)")
    count = 0
    for module in list(model.modules()):
        for conv_name, bn_name in _conv_bn_pairs(module):
            conv, bn = getattr(module, conv_name), getattr(module, bn_name)
            stats = _batch_norm_stats(bn)
            if type(conv) not in _CONVS or stats is None or len(stats[0]) != conv.out_channels:
                continue
            setattr(module, conv_name, _folded(conv, stats))
            setattr(module, bn_name, nn.Identity())
            count += 1
    return count


# Merging parallel convolutions, for inference.
#
# A CPU convolution costs tens of microseconds a call however small (oneDNN's fixed cost), and a
# small detector's branches are many small convolutions: the anchor-free YOLO head runs a box
# and a classification branch over each level's map, a CSP block a main and a bypass 1x1 over
# its input. Convolutions that read the same input are one convolution with their output
# channels stacked; convolutions that read consecutive channel slices of one map are one
# grouped convolution (equal shapes) or, for 1x1 kernels, one block-diagonal product. The
# modules that own such branches build the merged form in ``merge_parallel_convs()`` (after
# folding: a BatchNorm between a convolution and its activation would have to be merged too).


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
    merged = _new_conv(first, type(first), first.in_channels, out, first.groups)
    merged.weight.copy_(torch.cat([c.weight for c in convs]))
    merged.weight.data = _with_layout(merged.weight.data, first.weight)
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
        merged = _new_conv(first, nn.Conv2d, sum(ins), sum(outs), len(convs))
        merged.weight.copy_(torch.cat([c.weight for c in convs]))
    elif first.kernel_size == (1, 1) and first.stride == (1, 1) and first.padding == (0, 0):
        merged = _new_conv(first, Pointwise, sum(ins), sum(outs), 1)
        merged.weight.zero_()
        row = col = 0
        for conv in convs:
            merged.weight[row : row + conv.out_channels, col : col + conv.in_channels] = conv.weight
            row, col = row + conv.out_channels, col + conv.in_channels
    else:
        return None
    merged.weight.data = _with_layout(merged.weight.data, first.weight)
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


def fuse_for_inference(model: nn.Module) -> tuple[int, int]:
    """Fold BatchNorms (:func:`fuse_conv_bn`), then merge parallel convolutions
    (:func:`merge_parallel_convs`); returns both counts. What ``detkit predict`` runs."""
    return fuse_conv_bn(model), merge_parallel_convs(model)
