"""SSD "extra" layers: the blocks that keep shrinking the last backbone map into coarser ones."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn


def xavier_init(module: nn.Module) -> None:
    """Xavier-uniform weights and zero biases for every conv (the SSD paper's init)."""
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            nn.init.xavier_uniform_(layer.weight)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


def conv_bn_relu(in_ch: int, out_ch: int, kernel: int = 3, stride: int = 1, padding: int = 1):
    """Conv (no bias) + BatchNorm + ReLU, the unit of the light backbones."""
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=padding, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    )


def extra_block(
    in_ch: int, mid_ch: int, out_ch: int, stride: int, padding: int, batch_norm: bool = False
) -> nn.Sequential:
    """1x1 reduce then 3x3 (stride 2 to halve, or stride 1 without padding to go 5->3->1)."""
    if batch_norm:
        return nn.Sequential(
            conv_bn_relu(in_ch, mid_ch, kernel=1, padding=0),
            conv_bn_relu(mid_ch, out_ch, kernel=3, stride=stride, padding=padding),
        )
    return nn.Sequential(
        nn.Conv2d(in_ch, mid_ch, kernel_size=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(mid_ch, out_ch, kernel_size=3, stride=stride, padding=padding),
        nn.ReLU(inplace=True),
    )


# (mid, out, stride, padding) of SSD300's conv8_2 .. conv11_2: 19 -> 10 -> 5 -> 3 -> 1.
SSD300_EXTRAS: tuple[tuple[int, int, int, int], ...] = (
    (256, 512, 2, 1),
    (128, 256, 2, 1),
    (128, 256, 1, 0),
    (128, 256, 1, 0),
)


def make_extras(
    in_channels: int,
    specs: Sequence[Sequence[int]],
    batch_norm: bool = False,
) -> tuple[nn.ModuleList, list[int]]:
    """Chain of :func:`extra_block` from ``(mid, out, stride, padding)`` specs.

    Returns the blocks and the channel count of each output map.
    """
    blocks, channels = nn.ModuleList(), []
    for mid, out, stride, padding in specs:
        blocks.append(extra_block(in_channels, mid, out, stride, padding, batch_norm))
        channels.append(out)
        in_channels = out
    if not batch_norm:
        xavier_init(blocks)
    return blocks, channels
