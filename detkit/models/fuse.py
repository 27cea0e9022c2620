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

from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from detkit.models.merging import merge_parallel_convs, new_inference_conv, with_layout
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


def _folded(conv: nn.Conv2d, stats: tuple) -> nn.Conv2d:
    """A copy of ``conv`` (of its class) with the BatchNorm ``stats`` folded into its weight
    and bias."""
    fused = new_inference_conv(conv, type(conv), conv.in_channels, conv.out_channels, conv.groups)
    weight, bias = fuse_conv_bn_weights(conv.weight, conv.bias, *stats)
    fused.weight = nn.Parameter(with_layout(weight.detach(), conv.weight), False)
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


def fuse_for_inference(model: nn.Module) -> tuple[int, int]:
    """Fold BatchNorms (:func:`fuse_conv_bn`), then merge parallel convolutions
    (:func:`merge_parallel_convs`); returns both counts. What ``detkit predict`` runs."""
    return fuse_conv_bn(model), merge_parallel_convs(model)
