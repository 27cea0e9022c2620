"""Darknet-style CSP trunk for the YOLO detectors, and a wrapper that exposes the stride 8/16/32
maps of the torchvision trunks (without SSD's extra layers).

Every backbone returns a list of feature maps (finest first) and exposes ``out_channels``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from detkit.models.merging import stacked_convs
from detkit.models.pointwise import Pointwise

# The activations a CSP-Darknet model can be built with. SiLU is YOLOv5/v8's; on a CPU it costs
# 5-8x a ReLU or hard-swish (0.65 ms vs 0.1 ms on 8 x 32 x 64 x 64, 2 cores: its exp), which is
# 13% of the digits YOLO's inference (5.5 of 40.6 ms for a batch of 8, BatchNorm folded).
ACTIVATIONS = {"silu": nn.SiLU, "relu": nn.ReLU, "hardswish": nn.Hardswish}


def activation_module(name: str) -> nn.Module:
    """The in-place activation ``name`` (a key of ``ACTIVATIONS``)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"activation {name!r} is not one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name](inplace=True)


class ConvBNAct(nn.Sequential):
    """Conv (no bias) + BatchNorm + activation (SiLU by default), the unit of CSP-Darknet
    (YOLOv4/v5 style); ``groups=in_ch`` makes it depthwise; ``padding`` defaults to
    ``kernel // 2``; ``activation`` is a key of ``ACTIVATIONS``."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel: int = 3,
        stride: int = 1,
        groups: int = 1,
        padding: int | None = None,
        activation: str = "silu",
    ) -> None:
        padding = kernel // 2 if padding is None else padding
        # 1x1 convolutions (most of a CSP trunk's and neck's) may run as matrix products.
        pointwise = (kernel, stride, padding, groups) == (1, 1, 0, 1)
        super().__init__(
            (Pointwise if pointwise else nn.Conv2d)(
                in_ch, out_ch, kernel, stride=stride, padding=padding, groups=groups, bias=False
            ),
            nn.BatchNorm2d(out_ch, eps=1e-3, momentum=0.03),
            activation_module(activation),
        )
        # He init keeps activations at unit scale through deep stacks even before BatchNorm
        # statistics exist (torch's default init shrinks them ~3x per layer in eval mode).
        nn.init.kaiming_normal_(self[0].weight, mode="fan_in", nonlinearity="relu")


class Bottleneck(nn.Module):
    """1x1 then 3x3 convolution with an optional residual connection."""

    def __init__(self, channels: int, shortcut: bool = True, activation: str = "silu") -> None:
        super().__init__()
        self.conv1 = ConvBNAct(channels, channels, 1, activation=activation)
        self.conv2 = ConvBNAct(channels, channels, 3, activation=activation)
        self.shortcut = shortcut

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv2(self.conv1(x))
        return x + y if self.shortcut else y


class CSPBlock(nn.Module):
    """Cross-stage partial block: half the channels go through ``depth`` bottlenecks, the other
    half bypass them, and a 1x1 convolution fuses the two (CSPNet; YOLOv5's C3)."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        depth: int = 1,
        shortcut: bool = True,
        activation: str = "silu",
    ) -> None:
        super().__init__()
        hidden = out_ch // 2
        self.main = ConvBNAct(in_ch, hidden, 1, activation=activation)
        self.bypass = ConvBNAct(in_ch, hidden, 1, activation=activation)
        self.blocks = nn.Sequential(
            *[Bottleneck(hidden, shortcut, activation) for _ in range(depth)]
        )
        self.fuse = ConvBNAct(2 * hidden, out_ch, 1, activation=activation)
        # Inference only, without bottlenecks: main and bypass as one convolution, whose
        # output is the concatenation (see merge_parallel_convs).
        self.entry: nn.Sequential | None = None

    def forward(self, x: Tensor) -> Tensor:
        if self.entry is not None:
            return self.fuse(self.entry(x))
        return self.fuse(torch.cat((self.blocks(self.main(x)), self.bypass(x)), dim=1))

    def merge_parallel_convs(self) -> int:
        """Without bottlenecks (``depth=0``, as in the digits YOLO's neck), run ``main`` and
        ``bypass`` (two 1x1 convolutions of the input, BatchNorms folded) as one, whose output
        is what ``fuse`` reads: one product and no concatenation (see
        :func:`detkit.models.merging.merge_parallel_convs`; the digits YOLO's neck about a fifth
        faster). With bottlenecks the main half would reach them as a strided slice, which
        cost as much as the merge saved. Returns 1 if merged."""
        parts = (self.main, self.bypass)
        if self.entry is not None or len(self.blocks):
            return 0
        if not all(isinstance(p[1], nn.Identity) for p in parts):
            return 0  # BatchNorms not folded
        if type(self.main[2]) is not type(self.bypass[2]):
            return 0
        conv = stacked_convs([self.main[0], self.bypass[0]])
        if conv is None:
            return 0
        self.entry = nn.Sequential(conv, self.main[2])
        return 1


class SPPF(nn.Module):
    """Spatial pyramid pooling (fast): three chained 5x5 max-pools concatenated, which widens
    the receptive field of the coarsest map at almost no cost."""

    def __init__(self, channels: int, kernel: int = 5, activation: str = "silu") -> None:
        super().__init__()
        hidden = channels // 2
        self.reduce = ConvBNAct(channels, hidden, 1, activation=activation)
        self.pool = nn.MaxPool2d(kernel, stride=1, padding=kernel // 2)
        self.fuse = ConvBNAct(4 * hidden, channels, 1, activation=activation)

    def forward(self, x: Tensor) -> Tensor:
        x = self.reduce(x)
        p1 = self.pool(x)
        p2 = self.pool(p1)
        return self.fuse(torch.cat((x, p1, p2, self.pool(p2)), dim=1))


class CSPDarknet(nn.Module):
    """CSP-Darknet trunk: a stem, then stages of (3x3 stride-2 conv + CSP block).

    With five ``widths`` and the 3x3 stride-2 stem the stages sit at strides 2 (stem), 4, 8, 16
    and 32; ``out_stages`` picks which are returned (default the stride 8/16/32 maps YOLOv3
    predicts from). ``stem_stride=4`` makes the stem one 4x4 stride-4 convolution over
    non-overlapping patches (ConvNeXt's "patchify" stem): four ``widths`` then give strides 4,
    8, 16 and 32, and the full-resolution 3x3 convolutions, the costliest per output of a small
    trunk on a CPU, are gone.
    The default widths/depths are a light variant for CPU; ``widths=(32, 64, 128, 256, 512)``
    and ``depths=(1, 2, 3, 1)`` give YOLOv5-s proportions.

    Args:
        widths: channels of the stem and of each stage.
        depths: bottlenecks in each stage's CSP block (one entry per stage after the stem).
        out_stages: indices into the stages (0 = stem) whose outputs are returned.
        spp: end with an SPPF block on the last stage.
        stem_stride: 2 (3x3 stride-2 convolution, Darknet) or 4 (4x4 patches).
        activation: of every convolution, a key of ``ACTIVATIONS`` (default SiLU).
    """

    def __init__(
        self,
        widths: Sequence[int] = (16, 32, 64, 128, 256),
        depths: Sequence[int] = (1, 1, 1, 1),
        out_stages: Sequence[int] = (2, 3, 4),
        spp: bool = True,
        stem_stride: int = 2,
        activation: str = "silu",
    ) -> None:
        super().__init__()
        widths, depths = [int(w) for w in widths], [int(d) for d in depths]
        if len(depths) != len(widths) - 1:
            raise ValueError(
                f"CSPDarknet: depths needs one entry per stage after the stem "
                f"({len(widths) - 1}), got {depths}"
            )
        if not out_stages or not all(0 <= i < len(widths) for i in out_stages):
            raise ValueError(f"CSPDarknet: out_stages {list(out_stages)} must index {widths}")
        if stem_stride == 2:
            stem = ConvBNAct(3, widths[0], 3, stride=2, activation=activation)
        elif stem_stride == 4:
            stem = ConvBNAct(3, widths[0], 4, stride=4, padding=0, activation=activation)
        else:
            raise ValueError(f"CSPDarknet: stem_stride must be 2 or 4, got {stem_stride}")
        self.stages = nn.ModuleList([stem])
        for i, depth in enumerate(depths):
            layers = [ConvBNAct(widths[i], widths[i + 1], 3, stride=2, activation=activation)]
            layers.append(CSPBlock(widths[i + 1], widths[i + 1], depth, activation=activation))
            if spp and i == len(depths) - 1:
                layers.append(SPPF(widths[i + 1], activation=activation))
            self.stages.append(nn.Sequential(*layers))
        self.out_stages = [int(i) for i in out_stages]
        self.out_channels: list[int] = [widths[i] for i in self.out_stages]

    def forward(self, x: Tensor) -> list[Tensor]:
        outputs = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in self.out_stages:
                outputs.append(x)
            if i >= self.out_stages[-1]:
                break
        return outputs


class TrunkLevels(nn.Module):
    """The stride 8/16/32 maps of one of SSD's torchvision trunks, without its extra layers.

    ``trunk`` is e.g. :class:`detkit.models.backbones.ResNet18Backbone` or
    :class:`~detkit.models.backbones.MobileNetV3Backbone` (optional ``stem``, then ``stages``);
    their ``weights`` argument loads ImageNet weights.
    """

    def __init__(self, trunk: nn.Module) -> None:
        super().__init__()
        if not hasattr(trunk, "stages") or not hasattr(trunk, "out_channels"):
            raise ValueError(
                f"TrunkLevels needs a trunk with `stages` and `out_channels`, "
                f"got {type(trunk).__name__}"
            )
        self.stem = getattr(trunk, "stem", None) or nn.Identity()
        self.stages = trunk.stages
        self.out_channels: list[int] = list(trunk.out_channels[: len(trunk.stages)])

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.stem(x)
        outputs = []
        for stage in self.stages:
            x = stage(x)
            outputs.append(x)
        return outputs
