"""Prior boxes: Faster R-CNN anchors and SSD default boxes.

Every generator returns one ``[A, 4]`` xyxy pixel tensor shared by all images of a padded
batch (the images share one tensor size), ordered level by level, then row by row, column by
column, then anchor shape, the order heads flatten their outputs in.
YOLO priors and the k-means anchor fitter live in :mod:`detkit.matching.yolo_priors`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

Size = tuple[int, int]


def _check_sizes(image_size: Sequence[int], feature_map_sizes: Sequence[Sequence[int]]) -> None:
    if len(image_size) != 2 or min(image_size) <= 0:
        raise ValueError(f"image_size must be a positive (h, w) pair, got {tuple(image_size)}")
    for fm in feature_map_sizes:
        if len(fm) != 2 or min(fm) <= 0:
            raise ValueError(f"feature_map_sizes entries must be positive (h, w), got {fm}")


class AnchorGenerator:
    """Faster R-CNN / RPN anchors: ``sizes[l] x aspect_ratios[l]`` anchors per location of level l.

    Aspect ratio is height / width. Values and order equal
    ``torchvision.models.detection.anchor_utils.AnchorGenerator`` for the same settings
    (including its rounding of the base anchors and its integer strides ``image // grid``).
    """

    def __init__(
        self,
        sizes: Sequence[Sequence[float]] = ((128, 256, 512),),
        aspect_ratios: Sequence[Sequence[float]] = ((0.5, 1.0, 2.0),),
    ) -> None:
        if not isinstance(sizes[0], (list, tuple)):
            sizes = tuple((s,) for s in sizes)
        if not isinstance(aspect_ratios[0], (list, tuple)):
            aspect_ratios = (tuple(aspect_ratios),) * len(sizes)
        if len(sizes) != len(aspect_ratios):
            raise ValueError(
                f"sizes has {len(sizes)} levels but aspect_ratios has {len(aspect_ratios)}"
            )
        if any(r <= 0 for ratios in aspect_ratios for r in ratios):
            raise ValueError(f"aspect_ratios must be positive, got {aspect_ratios}")
        self.sizes = tuple(tuple(s) for s in sizes)
        self.aspect_ratios = tuple(tuple(a) for a in aspect_ratios)
        self.cell_anchors = [
            self._base_anchors(s, a) for s, a in zip(self.sizes, self.aspect_ratios, strict=True)
        ]

    @staticmethod
    def _base_anchors(scales: Sequence[float], ratios: Sequence[float]) -> Tensor:
        scales_t = torch.as_tensor(scales, dtype=torch.float32)
        h_ratios = torch.sqrt(torch.as_tensor(ratios, dtype=torch.float32))
        ws = ((1 / h_ratios)[:, None] * scales_t[None, :]).view(-1)
        hs = (h_ratios[:, None] * scales_t[None, :]).view(-1)
        return (torch.stack([-ws, -hs, ws, hs], dim=1) / 2).round()

    def num_anchors_per_location(self) -> list[int]:
        """Anchors per feature-map cell, one entry per level."""
        return [len(s) * len(a) for s, a in zip(self.sizes, self.aspect_ratios, strict=True)]

    def __call__(
        self,
        image_size: Sequence[int],
        feature_map_sizes: Sequence[Sequence[int]],
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """All anchors ``[A, 4]`` xyxy pixels for an (h, w) image and its feature maps."""
        _check_sizes(image_size, feature_map_sizes)
        if len(feature_map_sizes) != len(self.cell_anchors):
            raise ValueError(
                f"got {len(feature_map_sizes)} feature maps for {len(self.cell_anchors)} anchor"
                " levels"
            )
        out = []
        for (gh, gw), base in zip(feature_map_sizes, self.cell_anchors, strict=True):
            stride_h, stride_w = image_size[0] // gh, image_size[1] // gw
            shift_x = torch.arange(gw, dtype=torch.int32, device=device) * stride_w
            shift_y = torch.arange(gh, dtype=torch.int32, device=device) * stride_h
            sy, sx = torch.meshgrid(shift_y, shift_x, indexing="ij")
            shifts = torch.stack((sx, sy, sx, sy), dim=-1).reshape(-1, 1, 4)
            base = base.to(device=device, dtype=dtype)
            out.append((shifts + base.view(1, -1, 4)).reshape(-1, 4))
        return torch.cat(out).to(dtype)

    @staticmethod
    def inside_image(anchors: Tensor, image_size: Sequence[int], tolerance: float = 0.0) -> Tensor:
        """Mask ``[A]`` of anchors lying fully inside the (h, w) image (within ``tolerance`` px).

        Faster R-CNN ignores cross-boundary anchors while training: give them label -1.
        """
        h, w = image_size
        return (
            (anchors[:, 0] >= -tolerance)
            & (anchors[:, 1] >= -tolerance)
            & (anchors[:, 2] <= w + tolerance)
            & (anchors[:, 3] <= h + tolerance)
        )

    def __repr__(self) -> str:
        return f"AnchorGenerator(sizes={self.sizes}, aspect_ratios={self.aspect_ratios})"


class DefaultBoxGenerator:
    """SSD default boxes (Liu et al. 2016, section 2.2); same arguments as torchvision's.

    Level k has scale ``s_k`` (``min_ratio + (max_ratio - min_ratio) k / (m - 1)`` unless
    ``scales`` is given, plus a final 1.0), boxes ``(s_k, s_k)``, ``(s'_k, s'_k)`` with
    ``s'_k = sqrt(s_k s_{k+1})`` and ``(s_k sqrt(r), s_k / sqrt(r))`` and its transpose for each
    ratio r, centred at ``((i + 0.5) / f_k, (j + 0.5) / f_k)`` where ``f_k`` is the grid size or
    ``image / steps[k]``. ``clip`` clamps the normalised widths/heights to [0, 1].
    """

    def __init__(
        self,
        aspect_ratios: Sequence[Sequence[float]],
        min_ratio: float = 0.15,
        max_ratio: float = 0.9,
        scales: Sequence[float] | None = None,
        steps: Sequence[float] | None = None,
        clip: bool = True,
    ) -> None:
        levels = len(aspect_ratios)
        if steps is not None and len(steps) != levels:
            raise ValueError(f"steps has {len(steps)} entries for {levels} aspect_ratios levels")
        if scales is None:
            if levels > 1:
                span = max_ratio - min_ratio
                scales = [min_ratio + span * k / (levels - 1.0) for k in range(levels)] + [1.0]
            else:
                scales = [min_ratio, max_ratio]
        if len(scales) < levels + 1:
            raise ValueError(f"scales needs {levels + 1} entries (one extra), got {len(scales)}")
        self.aspect_ratios = [list(r) for r in aspect_ratios]
        self.scales = list(scales)
        self.steps = None if steps is None else list(steps)
        self.clip = clip
        self.wh_pairs = [self._wh_pairs(k) for k in range(levels)]

    def _wh_pairs(self, k: int) -> Tensor:
        s_k = self.scales[k]
        s_prime = math.sqrt(self.scales[k] * self.scales[k + 1])
        pairs = [[s_k, s_k], [s_prime, s_prime]]
        for ratio in self.aspect_ratios[k]:
            root = math.sqrt(ratio)
            pairs.extend([[s_k * root, s_k / root], [s_k / root, s_k * root]])
        pairs_t = torch.as_tensor(pairs, dtype=torch.float32)
        return pairs_t.clamp(min=0, max=1) if self.clip else pairs_t

    def num_anchors_per_location(self) -> list[int]:
        """Default boxes per feature-map cell, one entry per level."""
        return [2 + 2 * len(r) for r in self.aspect_ratios]

    def cxcywh(
        self, image_size: Sequence[int], feature_map_sizes: Sequence[Sequence[int]]
    ) -> Tensor:
        """Default boxes ``[P, 4]`` as normalised (cx, cy, w, h) in [0, 1] image units."""
        _check_sizes(image_size, feature_map_sizes)
        if len(feature_map_sizes) != len(self.wh_pairs):
            raise ValueError(
                f"got {len(feature_map_sizes)} feature maps for {len(self.wh_pairs)} levels"
            )
        out = []
        for k, (gh, gw) in enumerate(feature_map_sizes):
            if self.steps is not None:
                fx, fy = image_size[1] / self.steps[k], image_size[0] / self.steps[k]
            else:
                fy, fx = gh, gw
            xs = ((torch.arange(gw) + 0.5) / fx).to(torch.float32)
            ys = ((torch.arange(gh) + 0.5) / fy).to(torch.float32)
            cy, cx = torch.meshgrid(ys, xs, indexing="ij")
            n = len(self.wh_pairs[k])
            centres = torch.stack((cx.reshape(-1), cy.reshape(-1)), -1).repeat_interleave(n, 0)
            out.append(torch.cat((centres, self.wh_pairs[k].repeat(gh * gw, 1)), dim=1))
        return torch.cat(out)

    def __call__(
        self,
        image_size: Sequence[int],
        feature_map_sizes: Sequence[Sequence[int]],
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """Default boxes ``[P, 4]`` xyxy pixels for an (h, w) image (equal to torchvision's)."""
        boxes = self.cxcywh(image_size, feature_map_sizes)
        scale = torch.tensor([image_size[1], image_size[0]], dtype=torch.float32)
        half = 0.5 * boxes[:, 2:]
        xyxy = torch.cat(((boxes[:, :2] - half) * scale, (boxes[:, :2] + half) * scale), dim=1)
        return xyxy.to(device=device, dtype=dtype)

    def __repr__(self) -> str:
        return (
            f"DefaultBoxGenerator(aspect_ratios={self.aspect_ratios}, clip={self.clip}, "
            f"scales={self.scales}, steps={self.steps})"
        )
