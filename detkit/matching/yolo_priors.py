"""YOLO priors (per-scale grids with anchor sizes, YOLOv1's cells) and the anchor fitter.

A prior generator is called like the others, ``generator(image_size, feature_map_sizes)``,
and returns the reference its box coder works against: a :class:`YOLOGrid` for
:class:`YOLOPriors` (YOLOv3), :class:`YOLOv1Cells` for :class:`YOLOv1Grid`.

Flattened prior order, shared with the YOLO heads and :mod:`detkit.matching.yolo_assign`:
scale by scale, then grid row, grid column, then anchor of that scale.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor


class YOLOGrid(NamedTuple):
    """Per-prior layout of all scales, each ``[P, ...]`` in the flattened prior order, and
    the priors and image size it was made for (what target assignment needs)."""

    grid_xy: Tensor  # [P, 2] float: (col, row) of the cell
    anchor_wh: Tensor  # [P, 2] float: anchor (w, h) in pixels
    stride: Tensor  # [P] float: cell size in pixels
    level: Tensor  # [P] int64: scale index
    anchor_index: Tensor  # [P] int64: anchor index within its scale
    priors: YOLOPriors | None = None
    image_size: tuple[int, int] = (0, 0)

    def rows(self, index: Tensor) -> YOLOGrid:
        """The grid restricted to the priors ``index`` picks (any index shape)."""
        picked = (t[index] for t in self[:5])
        return YOLOGrid(*picked, self.priors, self.image_size)

    def boxes(self) -> Tensor:
        """Prior boxes ``[P, 4]`` xyxy pixels: anchor-sized boxes centred in their cells."""
        centre = (self.grid_xy + 0.5) * self.stride[:, None]
        half = 0.5 * self.anchor_wh
        return torch.cat((centre - half, centre + half), dim=1)


class YOLOv1Cells(NamedTuple):
    """YOLOv1's S x S cells over an (h, w) image: ``grid_xy [S, S, 1, 2]`` holds (col, row)
    and broadcasts over the K box predictors of each cell."""

    grid_xy: Tensor
    grid_size: int
    image_size: tuple[int, int]


class YOLOv1Grid:
    """The YOLOv1 prior generator: an S x S grid of cells over the whole image, whatever the
    feature map (the head pools its map to S x S)."""

    def __init__(self, grid_size: int = 7) -> None:
        if int(grid_size) < 1:
            raise ValueError(f"grid_size must be >= 1, got {grid_size}")
        self.grid_size = int(grid_size)

    def __call__(
        self,
        image_size: Sequence[int],
        feature_map_sizes: Sequence[Sequence[int]] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> YOLOv1Cells:
        s = self.grid_size
        rows, cols = torch.meshgrid(
            torch.arange(s, device=device), torch.arange(s, device=device), indexing="ij"
        )
        xy = torch.stack((cols, rows), dim=-1).to(dtype)[:, :, None, :]
        return YOLOv1Cells(xy, s, (int(image_size[0]), int(image_size[1])))

    def __repr__(self) -> str:
        return f"YOLOv1Grid(grid_size={self.grid_size})"


def wh_iou(wh1: Tensor, wh2: Tensor) -> Tensor:
    """IoU ``[N, K]`` of box shapes ``wh1 [N, 2]`` and ``wh2 [K, 2]`` placed at one centre."""
    inter = torch.minimum(wh1[:, None, 0], wh2[None, :, 0]) * torch.minimum(
        wh1[:, None, 1], wh2[None, :, 1]
    )
    union = (wh1[:, 0] * wh1[:, 1])[:, None] + (wh2[:, 0] * wh2[:, 1])[None, :] - inter
    return inter / union


class YOLOPriors:
    """YOLOv3-style priors: ``anchors[s]`` = list of (w, h) pixels for scale s of ``strides[s]``.

    The default is YOLOv3's COCO anchors at strides 8, 16, 32.
    """

    def __init__(
        self,
        anchors: Sequence[Sequence[Sequence[float]]] = (
            ((10, 13), (16, 30), (33, 23)),
            ((30, 61), (62, 45), (59, 119)),
            ((116, 90), (156, 198), (373, 326)),
        ),
        strides: Sequence[int] = (8, 16, 32),
    ) -> None:
        if len(anchors) != len(strides):
            raise ValueError(f"anchors has {len(anchors)} scales but strides has {len(strides)}")
        for scale in anchors:
            if not scale or any(len(a) != 2 or min(a) <= 0 for a in scale):
                raise ValueError(f"each anchor must be a positive (w, h) pair, got {scale}")
        self.anchors = [[(float(w), float(h)) for w, h in scale] for scale in anchors]
        self.strides = [int(s) for s in strides]

    def num_anchors_per_location(self) -> list[int]:
        """Anchors per grid cell, one entry per scale."""
        return [len(a) for a in self.anchors]

    def all_anchors(self) -> Tensor:
        """Every anchor ``[A, 2]`` (w, h), scale by scale."""
        return torch.tensor([wh for scale in self.anchors for wh in scale])

    def feature_map_sizes(self, image_size: Sequence[int]) -> list[tuple[int, int]]:
        """Grid (h, w) of each scale for an (h, w) image (ceil, as strided convs give)."""
        return [(math.ceil(image_size[0] / s), math.ceil(image_size[1] / s)) for s in self.strides]

    def grid(self, image_size: Sequence[int], device: torch.device | str | None = None) -> YOLOGrid:
        """Cell positions, anchor sizes and strides of every prior (see :class:`YOLOGrid`)."""
        parts: list[list[Tensor]] = [[], [], [], [], []]
        for level, ((gh, gw), stride) in enumerate(
            zip(self.feature_map_sizes(image_size), self.strides, strict=True)
        ):
            n = len(self.anchors[level])
            rows, cols = torch.meshgrid(
                torch.arange(gh, device=device), torch.arange(gw, device=device), indexing="ij"
            )
            xy = torch.stack((cols.reshape(-1), rows.reshape(-1)), -1).float()
            parts[0].append(xy.repeat_interleave(n, 0))
            anchors = torch.tensor(self.anchors[level], device=device)
            parts[1].append(anchors.repeat(gh * gw, 1))
            parts[2].append(torch.full((gh * gw * n,), float(stride), device=device))
            parts[3].append(torch.full((gh * gw * n,), level, device=device))
            parts[4].append(torch.arange(n, device=device).repeat(gh * gw))
        size = (int(image_size[0]), int(image_size[1]))
        return YOLOGrid(*(torch.cat(p) for p in parts), self, size)

    def __call__(
        self,
        image_size: Sequence[int],
        feature_map_sizes: Sequence[Sequence[int]] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> YOLOGrid:
        """The :class:`YOLOGrid` of an (h, w) image; ``feature_map_sizes`` (the head's maps),
        when given, must be the ones the strides give."""
        if feature_map_sizes is not None and [tuple(f) for f in feature_map_sizes] != (
            self.feature_map_sizes(image_size)
        ):
            raise ValueError(
                f"feature maps of sizes {[tuple(f) for f in feature_map_sizes]} do not match "
                f"the priors' strides {self.strides} for image size {tuple(image_size)}: do "
                "the backbone's strides match the priors'?"
            )
        return self.grid(image_size, device)

    def __repr__(self) -> str:
        return f"YOLOPriors(anchors={self.anchors}, strides={self.strides})"


def _kmeans_pp_init(wh: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """k-means++ seeding with the 1 - IoU distance."""
    first = torch.randint(len(wh), (1,), generator=generator)
    centroids = wh[first]
    for _ in range(1, k):
        dist = (1 - wh_iou(wh, centroids)).min(dim=1).values.clamp(min=0)
        weights = dist.square() if float(dist.sum()) > 0 else torch.ones_like(dist)
        pick = torch.multinomial(weights, 1, generator=generator)
        centroids = torch.cat((centroids, wh[pick]))
    return centroids


def fit_anchors(wh: Tensor, k: int = 9, iters: int = 300, seed: int = 0) -> Tensor:
    """k-means anchor shapes ``[k, 2]`` (w, h) with distance ``1 - IoU`` (YOLOv2, Redmon 2017).

    ``wh [N, 2]`` are positive box widths and heights. Seeded by k-means++; clusters are
    averaged; the result is sorted by area (smallest first), ready to split across scales.
    """
    if wh.dim() != 2 or wh.shape[1] != 2:
        raise ValueError(f"wh must have shape [N, 2], got {tuple(wh.shape)}")
    wh = wh.double()
    wh = wh[(wh > 0).all(dim=1)]
    if len(wh) < k:
        raise ValueError(f"need at least k={k} boxes with positive size, got {len(wh)}")
    generator = torch.Generator().manual_seed(seed)
    centroids = _kmeans_pp_init(wh, k, generator)
    assign = torch.full((len(wh),), -1, dtype=torch.int64)
    for _ in range(iters):
        new_assign = wh_iou(wh, centroids).argmax(dim=1)
        if torch.equal(new_assign, assign):
            break
        assign = new_assign
        sums = torch.zeros_like(centroids).index_add_(0, assign, wh)
        counts = torch.bincount(assign, minlength=k).to(wh.dtype)[:, None]
        # An emptied cluster keeps its old centre instead of becoming 0/0.
        centroids = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)
    order = (centroids[:, 0] * centroids[:, 1]).argsort()
    return centroids[order].float()


def fit_anchors_from_dataset(
    dataset,
    k: int = 9,
    image_size: int | Sequence[int] = 416,
    letterbox: bool = True,
    **kwargs,
) -> Tensor:
    """Fit anchors to a dataset's boxes (from ``dataset.to_coco()``) at the model's input size.

    Each box is scaled as its image is on the way to ``image_size`` (int or (h, w)): by
    ``letterbox`` (YOLO's transforms, and Ultralytics' autoanchor) one factor keeping the
    aspect ratio, the image fitting inside; else stretched per axis to fill it. Crowd
    annotations are skipped. ``kwargs`` go to :func:`fit_anchors`.
    """
    if not hasattr(dataset, "to_coco"):
        raise ValueError(f"dataset {type(dataset).__name__} has no to_coco() method")
    target_h, target_w = (image_size, image_size) if isinstance(image_size, int) else image_size
    coco = dataset.to_coco()
    scales = {}
    for img in coco["images"]:
        sx, sy = target_w / img["width"], target_h / img["height"]
        scales[img["id"]] = (min(sx, sy),) * 2 if letterbox else (sx, sy)
    wh = [
        (a["bbox"][2] * scales[a["image_id"]][0], a["bbox"][3] * scales[a["image_id"]][1])
        for a in coco["annotations"]
        if not a.get("iscrowd", 0)
    ]
    if not wh:
        raise ValueError("dataset has no (non-crowd) boxes to fit anchors to")
    return fit_anchors(torch.tensor(wh, dtype=torch.float64), k=k, **kwargs)
