"""SSD's convolutional predictors: one 3x3 conv per feature map giving, for each of the ``k``
default boxes at a location, ``C + 1`` class logits (background first) and 4 box offsets."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from detkit.models.softmax import per_prior_softmax


class SSDOutput(NamedTuple):
    """SSD predictions for every default box, in prior order."""

    class_logits: Tensor  # [B, P, C + 1], background first
    box: Tensor  # [B, P, 4] offsets for the box coder


class SSDHead(nn.Module):
    """Fused classification + regression predictors, ``(C + 1 + 4) * k`` channels per level.

    Channels are grouped per default box (``[logits_0..logits_C, dx, dy, dw, dh]`` for box 0,
    then box 1, ...) so a level's output reshapes to ``[B, H * W * k, C + 5]`` without copies;
    predictions come out location-major, box-minor, the order of the default boxes.

    Args:
        in_channels: channels of each feature map.
        num_anchors: default boxes per location of each feature map.
        num_classes: object classes ``C`` (the background logit is added here).
    """

    def __init__(
        self, in_channels: Sequence[int], num_anchors: Sequence[int], num_classes: int
    ) -> None:
        super().__init__()
        if len(in_channels) != len(num_anchors):
            raise ValueError(
                f"SSDHead got {len(in_channels)} feature maps (in_channels) but "
                f"{len(num_anchors)} anchor counts (num_anchors)"
            )
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.in_channels = [int(c) for c in in_channels]
        self.num_anchors = [int(a) for a in num_anchors]
        self.num_columns = self.num_classes + 1 + 4
        self.predictors = nn.ModuleList(
            nn.Conv2d(c, a * self.num_columns, kernel_size=3, padding=1)
            for c, a in zip(in_channels, num_anchors, strict=True)
        )
        for conv in self.predictors:
            nn.init.xavier_uniform_(conv.weight)
            nn.init.zeros_(conv.bias)

    def forward(self, features: Sequence[Tensor]) -> SSDOutput:
        """``class_logits [B, P, C + 1]`` and box offsets ``[B, P, 4]``."""
        if len(features) != len(self.predictors):
            raise ValueError(
                f"SSDHead expects {len(self.predictors)} feature maps, got {len(features)}"
            )
        outputs = []
        for x, conv in zip(features, self.predictors, strict=True):
            y = conv(x)
            batch = y.shape[0]
            outputs.append(y.permute(0, 2, 3, 1).reshape(batch, -1, self.num_columns))
        out = torch.cat(outputs, dim=1)
        return SSDOutput(out[..., : self.num_classes + 1], out[..., self.num_classes + 1 :])

    @staticmethod
    def scores(outputs: SSDOutput) -> Tensor:
        """Class scores ``[B, P, C]``: softmax over ``C + 1`` without the background column."""
        return per_prior_softmax(outputs.class_logits.float())[..., 1:]
