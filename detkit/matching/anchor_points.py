"""Anchor points: the prior generator of anchor-free detectors (YOLOv8-style, FCOS).

Every location of every feature map is one prediction, anchored at the centre of its cell
(``(col + 0.5, row + 0.5) * stride``) with no box shape attached. The reference it makes,
:class:`AnchorPointGrid`, is what :class:`~detkit.matching.DistanceCoder` decodes against and
what the task-aligned assigner takes its centre prior from.

Flattened order, shared with :class:`~detkit.models.heads.yolo.YOLOv8Head`: level by level
(finest first), then row, then column.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor


class AnchorPointGrid(NamedTuple):
    """The anchor points of all levels, ``[P, ...]`` in the flattened order."""

    points: Tensor  # [P, 2] float: (x, y) in input pixels
    stride: Tensor  # [P] float: cell size in pixels (the unit of the predicted distances)
    image_size: tuple[int, int] = (0, 0)

    def rows(self, index: Tensor) -> AnchorPointGrid:
        """The points ``index`` picks (any index shape)."""
        return AnchorPointGrid(self.points[index], self.stride[index], self.image_size)


class AnchorPoints:
    """Cell centres of feature maps at ``strides`` (default the stride 8/16/32 maps).

    Args:
        strides: the stride of each map the head predicts from, finest first.
        offset: where in its cell a point sits, in cells (0.5: the centre).
    """

    def __init__(self, strides: Sequence[int] = (8, 16, 32), offset: float = 0.5) -> None:
        strides = [int(s) for s in strides]
        if not strides or min(strides) < 1:
            raise ValueError(f"AnchorPoints: strides must be positive integers, got {strides}")
        if not 0.0 <= float(offset) < 1.0:
            raise ValueError(f"AnchorPoints: offset must be in [0, 1), got {offset}")
        self.strides = strides
        self.offset = float(offset)

    def feature_map_sizes(self, image_size: Sequence[int]) -> list[tuple[int, int]]:
        """Map (h, w) of each level for an (h, w) image (ceil, as padded strided convs give)."""
        return [(math.ceil(image_size[0] / s), math.ceil(image_size[1] / s)) for s in self.strides]

    def __call__(
        self,
        image_size: Sequence[int],
        feature_map_sizes: Sequence[Sequence[int]] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> AnchorPointGrid:
        """The :class:`AnchorPointGrid` of an (h, w) image; ``feature_map_sizes`` (the head's
        maps), when given, must be the ones the strides give."""
        expected = self.feature_map_sizes(image_size)
        if feature_map_sizes is not None and [tuple(f) for f in feature_map_sizes] != expected:
            raise ValueError(
                f"feature maps of sizes {[tuple(f) for f in feature_map_sizes]} do not match "
                f"the anchor points' strides {self.strides} for image size {tuple(image_size)} "
                f"(expected {expected}): do the backbone's strides match?"
            )
        points, strides = [], []
        for (gh, gw), stride in zip(expected, self.strides, strict=True):
            rows, cols = torch.meshgrid(
                torch.arange(gh, device=device, dtype=dtype),
                torch.arange(gw, device=device, dtype=dtype),
                indexing="ij",
            )
            xy = torch.stack((cols.reshape(-1), rows.reshape(-1)), dim=-1)
            points.append((xy + self.offset) * stride)
            strides.append(torch.full((gh * gw,), float(stride), device=device, dtype=dtype))
        size = (int(image_size[0]), int(image_size[1]))
        return AnchorPointGrid(torch.cat(points), torch.cat(strides), size)

    def __repr__(self) -> str:
        return f"AnchorPoints(strides={self.strides}, offset={self.offset})"
