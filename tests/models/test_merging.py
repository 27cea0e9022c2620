"""Merging parallel convolutions: the merged model gives the branches' outputs."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from detkit.models.backbones.darknet import CSPBlock
from detkit.models.fuse import fuse_conv_bn
from detkit.models.heads.yolo import YOLOv8Head
from detkit.models.merging import merge_parallel_convs, side_by_side_convs, stacked_convs
from detkit.models.pointwise import Pointwise


def _conv(cls, in_ch, out_ch, gen, **kwargs) -> nn.Conv2d:
    conv = cls(in_ch, out_ch, **kwargs).eval()
    with torch.no_grad():
        for p in conv.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return conv


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@torch.no_grad()
def test_stacked_convs_give_each_convolution_of_the_shared_input(layout):
    gen = torch.Generator().manual_seed(3)
    geometry = {"kernel_size": 3, "stride": 2, "padding": 1}
    convs = [_conv(nn.Conv2d, 6, 5, gen, **geometry), _conv(nn.Conv2d, 6, 3, gen, **geometry)]
    convs[1].bias = None  # a convolution without bias adds zeros
    for conv in convs:
        conv.to(memory_format=layout)
    x = torch.randn(2, 6, 11, 9, generator=gen).contiguous(memory_format=layout)
    merged = stacked_convs(convs)
    assert type(merged) is nn.Conv2d and merged.out_channels == 8
    assert merged.weight.is_contiguous(memory_format=layout)
    expected = torch.cat([F.conv2d(x, c.weight, c.bias, 2, 1) for c in convs], dim=1)
    torch.testing.assert_close(merged(x), expected, rtol=1e-5, atol=1e-5)
    pointwise = [
        _conv(Pointwise, 6, 4, gen, kernel_size=1),
        _conv(Pointwise, 6, 7, gen, kernel_size=1),
    ]
    assert type(stacked_convs(pointwise)) is Pointwise
    # other geometry or another input width: not one convolution of one input
    assert stacked_convs([convs[0], _conv(nn.Conv2d, 6, 5, gen, kernel_size=3, padding=1)]) is None
    assert stacked_convs([convs[0], _conv(nn.Conv2d, 4, 5, gen, **geometry)]) is None


@torch.no_grad()
def test_side_by_side_convs_give_each_convolution_of_its_own_slice():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 10, 7, 8, generator=gen)
    equal = [_conv(nn.Conv2d, 5, 4, gen, kernel_size=3, padding=1) for _ in range(2)]
    grouped = side_by_side_convs(equal)
    assert grouped.groups == 2 and (grouped.in_channels, grouped.out_channels) == (10, 8)
    expected = torch.cat([c(part) for c, part in zip(equal, x.split(5, 1), strict=True)], 1)
    torch.testing.assert_close(grouped(x), expected, rtol=1e-5, atol=1e-5)
    # 1x1 of unequal widths: one block-diagonal product
    unequal = [
        _conv(Pointwise, 3, 6, gen, kernel_size=1),
        _conv(Pointwise, 7, 2, gen, kernel_size=1),
    ]
    block = side_by_side_convs(unequal)
    assert type(block) is Pointwise and (block.in_channels, block.out_channels) == (10, 8)
    expected = torch.cat([c(part) for c, part in zip(unequal, x.split([3, 7], 1), strict=True)], 1)
    torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)
    # 3x3 of unequal widths, or convolutions grouped themselves: no single convolution
    assert (
        side_by_side_convs([equal[0], _conv(nn.Conv2d, 5, 3, gen, kernel_size=3, padding=1)])
        is None
    )
    depthwise = [_conv(nn.Conv2d, 4, 4, gen, kernel_size=3, groups=4) for _ in range(2)]
    assert side_by_side_convs(depthwise) is None


def _calibrated(module: nn.Module, gen: torch.Generator) -> nn.Module:
    """Eval mode with BatchNorm statistics and affine parameters away from the identity."""
    for bn in module.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.running_mean.normal_(0.0, 0.5, generator=gen)
            bn.bias.normal_(0.0, 0.5, generator=gen)
            bn.running_var.uniform_(0.5, 1.5, generator=gen)
            bn.weight.uniform_(0.5, 1.5, generator=gen)
    return module.eval()


@pytest.mark.parametrize(
    ("box_channels", "class_channels", "kind", "merged"),
    [(16, 16, "conv", True), (24, 16, "conv", True), (16, 16, "depthwise", False)],
    ids=["equal-widths", "unequal-widths", "depthwise"],
)
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@torch.no_grad()
def test_merged_yolov8_head_gives_the_branches_outputs(
    box_channels, class_channels, kind, merged, layout
):
    gen = torch.Generator().manual_seed(5)
    head = YOLOv8Head(
        [12, 20], 5, reg_max=8, box_channels=box_channels, class_channels=class_channels,
        strides=(8, 16), image_size=64, class_branch=kind, activation="hardswish",
    )  # fmt: skip
    for p in head.parameters():
        p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    head = _calibrated(head, gen).to(memory_format=layout)
    features = [
        torch.randn(2, 12, 8, 8, generator=gen).contiguous(memory_format=layout),
        torch.randn(2, 20, 4, 4, generator=gen).contiguous(memory_format=layout),
    ]
    expected = head(features)
    assert merge_parallel_convs(head) == 0  # BatchNorms not folded yet: nothing merged
    fuse_conv_bn(head)
    assert merge_parallel_convs(head) == (2 if merged else 0)
    assert merge_parallel_convs(head) == 0  # once
    if merged:
        convs = [m for m in head.merged_branches.modules() if isinstance(m, nn.Conv2d)]
        assert len(convs) == (6 if box_channels == class_channels else 10)
    out = head(features)
    for mine, theirs in zip(out, expected, strict=True):
        assert mine.shape == theirs.shape
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4 * float(theirs.abs().max()))


@torch.no_grad()
def test_merged_csp_block_without_bottlenecks_gives_the_same_map():
    gen = torch.Generator().manual_seed(6)
    block, deeper = CSPBlock(12, 16, depth=0), CSPBlock(12, 16, depth=1)
    for p in (*block.parameters(), *deeper.parameters()):
        p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    block, deeper = _calibrated(block, gen), _calibrated(deeper, gen)
    x = torch.randn(2, 12, 9, 7, generator=gen)
    expected = block(x)
    assert block.merge_parallel_convs() == 0  # BatchNorms not folded yet
    fuse_conv_bn(block), fuse_conv_bn(deeper)
    assert block.merge_parallel_convs() == 1 and block.merge_parallel_convs() == 0
    assert block.entry[0].out_channels == 16  # main and bypass, 8 each
    scale = float(expected.abs().max())
    torch.testing.assert_close(block(x), expected, rtol=1e-4, atol=1e-4 * scale)
    assert deeper.merge_parallel_convs() == 0  # bottlenecks read the main half: not merged


def test_merging_refuses_a_model_in_training_mode():
    with pytest.raises(ValueError, match="eval"):
        merge_parallel_convs(CSPBlock(4, 4))
