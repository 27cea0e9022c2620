"""The YOLOv3 feature pyramid: upsample the coarse map, concatenate with the finer one, fuse.

YOLOv3 has the top-down path only; ``bottom_up=True`` adds PANet's second, bottom-up pass
(downsample + concatenate), as YOLOv4/v5 do.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detkit.models.backbones.darknet import ConvBNAct, CSPBlock


class YOLOPAN(nn.Module):
    """Feature pyramid over backbone maps ``[C3, C4, C5]`` (finest first), same order out.

    Args:
        in_channels: channels of the backbone maps (finest first), e.g. ``backbone.out_channels``.
        out_channels: channels of the output maps; defaults to ``in_channels``.
        depth: bottlenecks in each fusing CSP block.
        bottom_up: add the PANet bottom-up path after the top-down one.
        top_block: fuse the coarsest map with a CSP block before the top-down path (YOLOv5's
            neck); False passes it on as it is (YOLOv8's, whose trunk ends in a CSP block or
            SPPF already). Its output width is then the input's.
        activation: of every convolution (see ``darknet.ACTIVATIONS``; default SiLU).
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        out_channels: Sequence[int] | None = None,
        depth: int = 1,
        bottom_up: bool = False,
        activation: str = "silu",
        top_block: bool = True,
    ) -> None:
        super().__init__()
        in_channels = [int(c) for c in in_channels]
        out_channels = in_channels if out_channels is None else [int(c) for c in out_channels]
        if len(in_channels) < 2 or len(out_channels) != len(in_channels):
            raise ValueError(
                f"YOLOPAN: need >= 2 levels and one out channel per level, got in_channels="
                f"{in_channels}, out_channels={out_channels}"
            )
        if not top_block and out_channels[-1] != in_channels[-1]:
            raise ValueError(
                f"YOLOPAN: without top_block the coarsest map keeps its {in_channels[-1]} "
                f"channels, got out_channels={out_channels}"
            )
        n = len(in_channels)
        act = {"activation": activation}
        self.top = (
            CSPBlock(in_channels[-1], out_channels[-1], depth, shortcut=False, **act)
            if top_block
            else nn.Identity()
        )
        # Top-down: reduce the coarse map, upsample x2, concat with the finer input, fuse.
        self.reduce = nn.ModuleList()
        self.fuse_down = nn.ModuleList()
        for i in range(n - 2, -1, -1):
            half = out_channels[i + 1] // 2
            self.reduce.append(ConvBNAct(out_channels[i + 1], half, 1, **act))
            self.fuse_down.append(
                CSPBlock(in_channels[i] + half, out_channels[i], depth, shortcut=False, **act)
            )
        self.downsample = nn.ModuleList()
        self.fuse_up = nn.ModuleList()
        if bottom_up:
            for i in range(1, n):
                self.downsample.append(
                    ConvBNAct(out_channels[i - 1], out_channels[i - 1], 3, 2, **act)
                )
                self.fuse_up.append(
                    CSPBlock(
                        out_channels[i - 1] + out_channels[i], out_channels[i], depth, False, **act
                    )
                )
        self.out_channels: list[int] = out_channels

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        if len(features) != len(self.out_channels):
            raise ValueError(
                f"YOLOPAN was built for {len(self.out_channels)} maps, got {len(features)}"
            )
        outs = [self.top(features[-1])]
        for reduce, fuse, finer in zip(self.reduce, self.fuse_down, features[-2::-1], strict=True):
            coarse = reduce(outs[0])
            up = F.interpolate(coarse, size=finer.shape[-2:], mode="nearest")
            outs.insert(0, fuse(torch.cat((up, finer), dim=1)))
        for i, (down, fuse) in enumerate(zip(self.downsample, self.fuse_up, strict=True)):
            outs[i + 1] = fuse(torch.cat((down(outs[i]), outs[i + 1]), dim=1))
        return outs
