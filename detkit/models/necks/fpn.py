"""Feature Pyramid Network (Lin et al., 2017): 1x1 laterals, nearest top-down upsampling and
3x3 output convolutions, plus the max-pooled extra level Faster R-CNN's RPN uses.

Module names mirror ``torchvision.ops.FeaturePyramidNetwork`` (``inner_blocks.i.0``,
``layer_blocks.i.0``) so torchvision detectors' weights load without renaming.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn


class FeaturePyramidNetwork(nn.Module):
    """Top-down pyramid over a backbone's maps (fine to coarse), all with ``out_channels``.

    Args:
        in_channels_list: channels of each input map, finest first.
        out_channels: channels of every output map.
        extra_pool: append a level max-pooled from the coarsest output (kernel 1, stride 2),
            torchvision's ``LastLevelMaxPool`` (the "pool" level of its RPN).
    """

    def __init__(
        self, in_channels_list: Sequence[int], out_channels: int = 256, extra_pool: bool = True
    ) -> None:
        super().__init__()
        if not in_channels_list or min(in_channels_list) <= 0:
            raise ValueError(f"in_channels_list must hold positive ints, got {in_channels_list}")
        self.inner_blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, out_channels, 1)) for c in in_channels_list
        )
        self.layer_blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(out_channels, out_channels, 3, padding=1))
            for _ in in_channels_list
        )
        self.extra_pool = extra_pool
        num_out = len(in_channels_list) + int(extra_pool)
        self.out_channels: list[int] = [int(out_channels)] * num_out
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1)
                nn.init.zeros_(m.bias)

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        if len(features) != len(self.inner_blocks):
            raise ValueError(f"FPN expects {len(self.inner_blocks)} maps, got {len(features)}")
        last_inner = self.inner_blocks[-1](features[-1])
        results = [self.layer_blocks[-1](last_inner)]
        for idx in range(len(features) - 2, -1, -1):
            lateral = self.inner_blocks[idx](features[idx])
            top_down = F.interpolate(last_inner, size=lateral.shape[-2:], mode="nearest")
            last_inner = lateral + top_down
            results.insert(0, self.layer_blocks[idx](last_inner))
        if self.extra_pool:
            results.append(F.max_pool2d(results[-1], kernel_size=1, stride=2, padding=0))
        return results
