"""Box coders: turn boxes into regression targets relative to a reference, and back.

Every coder has the same two methods, reference first:

- ``encode(reference, boxes) -> targets``: what the network should predict for ``boxes``;
- ``decode(reference, deltas) -> boxes``: xyxy pixels from what the network predicted.

The reference is what the detector's prior generator made for the image size: prior boxes
``[P, 4]`` for :class:`DeltaXYWHCoder`, a :class:`~detkit.matching.YOLOGrid` for
:class:`YOLOv3Coder`, the :class:`~detkit.matching.YOLOv1Cells` for :class:`YOLOv1Coder`, an
:class:`~detkit.matching.AnchorPointGrid` for :class:`DistanceCoder`. All coders broadcast
over leading dimensions, so ``[B, P, 4]`` predictions against ``[P, 4]`` priors work without
a loop over images.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def _centre_size(boxes: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    w = boxes[..., 2] - boxes[..., 0]
    h = boxes[..., 3] - boxes[..., 1]
    return boxes[..., 0] + 0.5 * w, boxes[..., 1] + 0.5 * h, w, h


def _corners(cx: Tensor, cy: Tensor, w: Tensor, h: Tensor) -> Tensor:
    half_w, half_h = 0.5 * w, 0.5 * h
    return torch.stack((cx - half_w, cy - half_h, cx + half_w, cy + half_h), dim=-1)


def _check_last_dim(name: str, t: Tensor, size: int) -> None:
    if t.shape[-1] != size:
        raise ValueError(f"{name} must have shape [..., {size}], got {tuple(t.shape)}")


class DeltaXYWHCoder:
    """Faster R-CNN / SSD offsets ``(wx dx/w_a, wy dy/h_a, ww log(w/w_a), wh log(h/h_a))``.

    Equal to ``torchvision.models.detection._utils.BoxCoder(weights, bbox_xform_clip)``'s
    ``encode_single``/``decode_single``; SSD's variances (0.1, 0.2) are weights (10, 10, 5, 5).
    ``decode`` clamps the width/height exponents at ``bbox_xform_clip`` like torchvision.
    """

    def __init__(
        self,
        weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
        bbox_xform_clip: float = math.log(1000.0 / 16),
    ) -> None:
        if len(weights) != 4:
            raise ValueError(f"weights must have 4 entries (wx, wy, ww, wh), got {weights}")
        self.weights = tuple(float(w) for w in weights)
        self.bbox_xform_clip = bbox_xform_clip

    def encode(self, priors: Tensor, boxes: Tensor) -> Tensor:
        """Targets ``[..., 4]`` that move ``priors [..., 4]`` onto ``boxes [..., 4]`` (xyxy)."""
        _check_last_dim("boxes", boxes, 4)
        _check_last_dim("priors", priors, 4)
        wx, wy, ww, wh = self.weights
        px, py, pw, ph = _centre_size(priors)
        gx, gy, gw, gh = _centre_size(boxes)
        return torch.stack(
            (
                wx * (gx - px) / pw,
                wy * (gy - py) / ph,
                ww * torch.log(gw / pw),
                wh * torch.log(gh / ph),
            ),
            dim=-1,
        )

    def decode(self, priors: Tensor, deltas: Tensor) -> Tensor:
        """Boxes ``[..., 4]`` xyxy from ``priors [..., 4]`` and regression outputs ``deltas``."""
        _check_last_dim("deltas", deltas, 4)
        _check_last_dim("priors", priors, 4)
        priors = priors.to(deltas.dtype)
        wx, wy, ww, wh = self.weights
        px, py, pw, ph = _centre_size(priors)
        dw = torch.clamp(deltas[..., 2] / ww, max=self.bbox_xform_clip)
        dh = torch.clamp(deltas[..., 3] / wh, max=self.bbox_xform_clip)
        cx = deltas[..., 0] / wx * pw + px
        cy = deltas[..., 1] / wy * ph + py
        return _corners(cx, cy, torch.exp(dw) * pw, torch.exp(dh) * ph)

    def __repr__(self) -> str:
        return f"DeltaXYWHCoder(weights={self.weights}, bbox_xform_clip={self.bbox_xform_clip})"


class YOLOv3Coder:
    """YOLOv3 targets: centre offset inside the cell and log size ratio to the anchor.

    The reference is a :class:`~detkit.matching.YOLOGrid` (or rows of one): ``grid_xy
    [..., 2]`` the (col, row) of each cell, ``anchor_wh [..., 2]`` the anchor size in pixels,
    ``stride [...]`` the cell size in pixels. ``encode`` returns ``(ox, oy, log(w/a_w),
    log(h/a_h))`` where ``ox, oy`` in [0, 1) are the targets of ``sigmoid(t_x), sigmoid(t_y)``;
    ``decode`` takes the raw network outputs ``(t_x, t_y, t_w, t_h)`` and applies sigmoid/exp:
    ``cx = (sigmoid(t_x) + col) * stride``, ``w = a_w exp(t_w)``.
    """

    def __init__(self, size_clip: float = math.log(1000.0 / 16)) -> None:
        self.size_clip = size_clip

    def encode(self, grid, boxes: Tensor) -> Tensor:
        """Targets ``[..., 4]`` = ``(ox, oy, log w ratio, log h ratio)`` (see class doc)."""
        _check_last_dim("boxes", boxes, 4)
        stride = grid.stride.to(boxes.dtype)
        cx, cy, w, h = _centre_size(boxes)
        return torch.stack(
            (
                cx / stride - grid.grid_xy[..., 0],
                cy / stride - grid.grid_xy[..., 1],
                torch.log(w / grid.anchor_wh[..., 0]),
                torch.log(h / grid.anchor_wh[..., 1]),
            ),
            dim=-1,
        )

    def decode(self, grid, raw: Tensor) -> Tensor:
        """Boxes ``[..., 4]`` xyxy pixels from raw outputs ``(t_x, t_y, t_w, t_h)``."""
        _check_last_dim("raw", raw, 4)
        stride = grid.stride.to(raw.dtype)
        cx = (torch.sigmoid(raw[..., 0]) + grid.grid_xy[..., 0]) * stride
        cy = (torch.sigmoid(raw[..., 1]) + grid.grid_xy[..., 1]) * stride
        w = torch.exp(raw[..., 2].clamp(max=self.size_clip)) * grid.anchor_wh[..., 0]
        h = torch.exp(raw[..., 3].clamp(max=self.size_clip)) * grid.anchor_wh[..., 1]
        return _corners(cx, cy, w, h)


class YOLOv1Coder:
    """YOLOv1 targets: centre relative to its cell, square roots of image-relative size.

    The reference is the :class:`~detkit.matching.YOLOv1Cells` of an S x S grid over an
    (h, w) image. ``encode`` gives ``(cx S / w - col, cy S / h - row, sqrt(bw / w),
    sqrt(bh / h))``; ``decode`` inverts it (squaring the size outputs, which need not be
    positive while training). ``cells.grid_xy`` broadcasts against the boxes' leading dims.
    """

    def encode(self, cells, boxes: Tensor) -> Tensor:
        """Targets ``[..., 4]`` for boxes ``[..., 4]`` xyxy pixels in their cells."""
        _check_last_dim("boxes", boxes, 4)
        img_h, img_w = cells.image_size
        s = cells.grid_size
        cx, cy, w, h = _centre_size(boxes)
        return torch.stack(
            (
                cx * s / img_w - cells.grid_xy[..., 0],
                cy * s / img_h - cells.grid_xy[..., 1],
                torch.sqrt((w / img_w).clamp(min=0)),
                torch.sqrt((h / img_h).clamp(min=0)),
            ),
            dim=-1,
        )

    def decode(self, cells, codes: Tensor) -> Tensor:
        """Boxes ``[..., 4]`` xyxy pixels from ``(x, y, sqrt w, sqrt h)`` codes."""
        _check_last_dim("codes", codes, 4)
        img_h, img_w = cells.image_size
        s = cells.grid_size
        cx = (codes[..., 0] + cells.grid_xy[..., 0]) * img_w / s
        cy = (codes[..., 1] + cells.grid_xy[..., 1]) * img_h / s
        return _corners(cx, cy, codes[..., 2].square() * img_w, codes[..., 3].square() * img_h)


class DistanceCoder:
    """Anchor-free boxes as distances (left, top, right, bottom) from an anchor point, in
    units of its stride, predicted as a discrete distribution (distribution focal loss, Li
    et al. 2020; YOLOv8).

    The reference is an :class:`~detkit.matching.AnchorPointGrid` (or rows of one):
    ``points [..., 2]`` (x, y) pixels, ``stride [...]`` pixels. ``encode`` gives the four
    distances of a box from its point in stride units (not clamped: the loss clamps them to
    the distribution's support ``[0, reg_max - 1]``). ``decode`` takes the raw head outputs,
    logits ``[..., 4, reg_max]`` over the bins ``0, 1, ..., reg_max - 1``, and uses the
    expectation of each side's softmax as its distance, so boxes reach at most
    ``(reg_max - 1) * stride`` from their point on each side.

    Args:
        reg_max: bins per side (16 in YOLOv8).
    """

    def __init__(self, reg_max: int = 16) -> None:
        if int(reg_max) < 2:
            raise ValueError(f"DistanceCoder: reg_max must be >= 2 bins, got {reg_max}")
        self.reg_max = int(reg_max)

    def encode(self, grid, boxes: Tensor) -> Tensor:
        """Distances ``[..., 4]`` (left, top, right, bottom) / stride of ``boxes`` (xyxy)."""
        _check_last_dim("boxes", boxes, 4)
        points = grid.points.to(boxes.dtype)
        stride = grid.stride.to(boxes.dtype)[..., None]
        return torch.cat((points - boxes[..., :2], boxes[..., 2:] - points), dim=-1) / stride

    def distances(self, logits: Tensor) -> Tensor:
        """The expected distance ``[..., 4]`` (stride units) of each side's distribution."""
        if logits.dim() < 2 or tuple(logits.shape[-2:]) != (4, self.reg_max):
            raise ValueError(
                f"DistanceCoder(reg_max={self.reg_max}): logits must have shape "
                f"[..., 4, {self.reg_max}], got {tuple(logits.shape)}"
            )
        bins = torch.arange(self.reg_max, dtype=logits.dtype, device=logits.device)
        return logits.softmax(dim=-1) @ bins

    def boxes(self, grid, distances: Tensor) -> Tensor:
        """Boxes ``[..., 4]`` xyxy pixels from distances ``[..., 4]`` in stride units."""
        _check_last_dim("distances", distances, 4)
        points = grid.points.to(distances.dtype)
        scaled = distances * grid.stride.to(distances.dtype)[..., None]
        return torch.cat((points - scaled[..., :2], points + scaled[..., 2:]), dim=-1)

    def decode(self, grid, logits: Tensor) -> Tensor:
        """Boxes ``[..., 4]`` xyxy pixels from distribution logits ``[..., 4, reg_max]``."""
        return self.boxes(grid, self.distances(logits))

    def __repr__(self) -> str:
        return f"DistanceCoder(reg_max={self.reg_max})"
