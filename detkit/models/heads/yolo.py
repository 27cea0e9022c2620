"""YOLO heads (v1, v3 with anchors, v8 anchor-free): raw predictions and their class scores.

A head is ``head(features) -> outputs`` (a named tuple whose ``box`` field is what the box
coder decodes) plus ``head.scores(outputs) -> [B, ..., C]`` class-specific confidences. Boxes
are decoded by the detector's box coder against its prior generator's reference, and the loss
receives the same outputs, reference and coder: heads hold no priors, grid or coder.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detkit.models.backbones.darknet import ConvBNAct
from detkit.models.merging import side_by_side_convs, stacked_convs
from detkit.models.pointwise import Pointwise


class YOLOv1Output(NamedTuple):
    """YOLOv1 predictions of an S x S grid with K boxes per cell (activations applied)."""

    box: Tensor  # [B, S, S, K, 4]: x, y in the cell, sqrt(w / W), sqrt(h / H), all in (0, 1)
    confidence: Tensor  # [B, S, S, K] in (0, 1): Pr(object) * IoU
    class_prob: Tensor  # [B, S, S, C]: Pr(class | object), sums to 1 per cell


class YOLOv3Output(NamedTuple):
    """YOLOv3 logits of every prior (views into one ``[B, P, 5 + C]`` tensor)."""

    box: Tensor  # [B, P, 4]: t_x, t_y, t_w, t_h
    objectness: Tensor  # [B, P]
    class_logits: Tensor  # [B, P, C]


class YOLOv1Head(nn.Module):
    """The YOLOv1 output: 3x3 convs (one of stride 2), a 1x1 predictor of ``K*5 + C`` maps.

    At 448 px on a stride-32 backbone the stride-2 conv gives the paper's 7x7 grid (stride 64);
    ``downsample=False`` keeps the backbone's stride (e.g. a 4x4 grid at 128 px). A larger map
    is average-pooled to ``grid_size`` so the grid is always S x S; a smaller one is an error,
    since stretching it would give neighbouring cells the same features (they could not tell
    their objects apart). The paper's outputs are linear; here x, y, sqrt w, sqrt h and the
    confidence pass through a sigmoid (their targets lie in [0, 1]) and the class scores
    through a softmax, which keeps the sum-squared loss from diverging early in training
    without changing its targets.

    Args:
        in_channels: channels of the backbone map (an int, or a list whose last entry is used).
        num_classes: object classes C.
        grid_size: S (the same as the detector's :class:`~detkit.matching.YOLOv1Grid`).
        num_boxes: K, box predictors per cell (B = 2 in the paper).
        hidden: channels of the head's conv layers.
        downsample: whether the middle conv has stride 2.
    """

    def __init__(
        self,
        in_channels: int | Sequence[int],
        num_classes: int,
        grid_size: int = 7,
        num_boxes: int = 2,
        hidden: int = 256,
        downsample: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(in_channels, int):
            in_channels = int(list(in_channels)[-1])
        if num_classes < 1 or grid_size < 1 or num_boxes < 1:
            raise ValueError(
                f"YOLOv1Head: num_classes ({num_classes}), grid_size ({grid_size}) and "
                f"num_boxes ({num_boxes}) must be >= 1"
            )
        self.num_classes, self.grid_size, self.num_boxes = num_classes, grid_size, num_boxes
        self.convs = nn.Sequential(
            ConvBNAct(in_channels, hidden, 3),
            ConvBNAct(hidden, hidden, 3, stride=2 if downsample else 1),
            ConvBNAct(hidden, hidden, 3),
        )
        self.predictor = Pointwise(hidden, num_boxes * 5 + num_classes, 1)
        nn.init.normal_(self.predictor.weight, std=0.01)
        nn.init.zeros_(self.predictor.bias)

    def forward(self, features: Tensor | Sequence[Tensor]) -> YOLOv1Output:
        x = features if isinstance(features, Tensor) else features[-1]
        x = self.convs(x)
        s = self.grid_size
        if x.shape[-2] < s or x.shape[-1] < s:
            raise ValueError(
                f"YOLOv1Head: the head's map is {tuple(x.shape[-2:])}, smaller than the "
                f"{s}x{s} grid; use a larger image, a smaller grid_size or downsample=False"
            )
        if tuple(x.shape[-2:]) != (s, s):
            x = F.adaptive_avg_pool2d(x, (s, s))
        y = self.predictor(x).permute(0, 2, 3, 1)  # [B, S, S, K*5 + C]
        k = self.num_boxes
        boxes = y[..., : 5 * k].reshape(*y.shape[:3], k, 5).sigmoid()
        return YOLOv1Output(boxes[..., :4], boxes[..., 4], y[..., 5 * k :].softmax(dim=-1))

    @staticmethod
    def scores(outputs: YOLOv1Output) -> Tensor:
        """Class-specific confidences ``Pr(class) * conf``, ``[B, S, S, K, C]``."""
        return outputs.class_prob[:, :, :, None, :] * outputs.confidence[..., None]


class YOLOv3Head(nn.Module):
    """YOLOv3 predictors: a 1x1 conv per scale giving ``A * (5 + C)`` maps.

    Per anchor the columns are ``(t_x, t_y, t_w, t_h, objectness, class_0..class_C-1)`` logits.
    Outputs are flattened scale by scale, row, column, anchor: the order of
    :class:`detkit.matching.YOLOPriors`.

    Args:
        in_channels: channels of each scale's map (finest first), e.g. the neck's.
        num_anchors: anchors per location of each scale (the priors'
            ``num_anchors_per_location()``).
        num_classes: object classes C (sigmoid per class, no background).
        prior_prob: initial objectness and class probability (bias init, as RetinaNet), so
            the thousands of empty cells do not swamp the first updates.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        num_anchors: Sequence[int],
        num_classes: int,
        prior_prob: float = 0.01,
    ) -> None:
        super().__init__()
        if len(in_channels) != len(num_anchors):
            raise ValueError(
                f"YOLOv3Head got {len(in_channels)} feature maps (in_channels) but "
                f"{len(num_anchors)} anchor counts (num_anchors)"
            )
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.num_anchors = [int(a) for a in num_anchors]
        self.num_columns = 5 + self.num_classes
        self.predictors = nn.ModuleList(
            Pointwise(c, a * self.num_columns, 1)
            for c, a in zip(in_channels, self.num_anchors, strict=True)
        )
        bias_value = -math.log((1 - prior_prob) / prior_prob)
        for conv, a in zip(self.predictors, self.num_anchors, strict=True):
            nn.init.normal_(conv.weight, std=0.01)
            bias = torch.zeros(a, self.num_columns)
            bias[:, 4:] = bias_value
            conv.bias.data.copy_(bias.view(-1))

    def forward(self, features: Sequence[Tensor]) -> YOLOv3Output:
        if len(features) != len(self.predictors):
            raise ValueError(
                f"YOLOv3Head expects {len(self.predictors)} feature maps, got {len(features)}"
            )
        outputs = []
        for x, conv in zip(features, self.predictors, strict=True):
            y = conv(x)
            batch, _, h, w = y.shape
            # [B, A*(5+C), H, W] -> [B, H, W, A, 5+C] -> [B, H*W*A, 5+C]
            y = y.view(batch, -1, self.num_columns, h, w).permute(0, 3, 4, 1, 2)
            outputs.append(y.reshape(batch, -1, self.num_columns))
        raw = torch.cat(outputs, dim=1)
        return YOLOv3Output(raw[..., :4], raw[..., 4], raw[..., 5:])

    @staticmethod
    def scores(outputs: YOLOv3Output) -> Tensor:
        """``sigmoid(objectness) * sigmoid(class) [B, P, C]``."""
        return (
            outputs.objectness.float().sigmoid()[..., None] * outputs.class_logits.float().sigmoid()
        )


class YOLOv8Output(NamedTuple):
    """Anchor-free YOLO logits of every anchor point (see :class:`YOLOv8Head`)."""

    box: Tensor  # [B, P, 4, R]: distribution logits of the (left, top, right, bottom) distances
    class_logits: Tensor  # [B, P, C]


class YOLOv8Head(nn.Module):
    """The anchor-free, decoupled YOLO head (YOLOv8 / YOLO11): per level, a box branch and a
    classification branch (two 3x3 convs each, then a 1x1 predictor) over the neck's maps.

    The box branch predicts, per anchor point, four distributions over ``reg_max`` distance
    bins (decoded by :class:`~detkit.matching.DistanceCoder`); the classification branch one
    sigmoid logit per class (no objectness: the task-aligned soft targets teach the class
    scores to rank by localisation quality too). Outputs are flattened level by level (finest
    first), row, column: the order of :class:`~detkit.matching.AnchorPoints`.

    Args:
        in_channels: channels of each level's map (finest first), e.g. the neck's.
        num_classes: object classes C.
        reg_max: distance bins per side (the coder's ``reg_max``).
        box_channels: width of the box branch (default ``max(16, in_channels[0] // 4,
            4 * reg_max)``, as YOLOv8).
        class_channels: width of the classification branch (default ``max(in_channels[0],
            min(num_classes, 100))``, as YOLOv8).
        strides, image_size, objects_per_image: the classification bias init of YOLOv8:
            level ``l`` starts at probability ``objects_per_image / (C * cells_l)``, with
            ``cells_l`` the cells of a level of stride ``strides[l]`` on an ``image_size``
            image, so the thousands of empty cells do not swamp the first updates (about
            twice as fast to fit as a flat 1% on the digits).
        prior_prob: a flat initial class probability instead (RetinaNet's bias init).
        box_branch, class_branch: ``"conv"`` (two 3x3 convs, YOLOv8) or ``"depthwise"``
            (two depthwise 3x3 + pointwise pairs, YOLO11's classification branch: a fraction
            of the cost at the same width).
        activation: of the branches' convolutions (see ``darknet.ACTIVATIONS``; default SiLU).

    The box logits start uniform (every side at the middle of its range).
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        reg_max: int = 16,
        box_channels: int | None = None,
        class_channels: int | None = None,
        strides: Sequence[int] = (8, 16, 32),
        image_size: int | Sequence[int] = 640,
        objects_per_image: float = 5.0,
        prior_prob: float | None = None,
        box_branch: str = "conv",
        class_branch: str = "conv",
        activation: str = "silu",
    ) -> None:
        super().__init__()
        in_channels = [int(c) for c in in_channels]
        for kind in (box_branch, class_branch):
            if kind not in BRANCHES:
                raise ValueError(f"YOLOv8Head: branch {kind!r} is not one of {BRANCHES}")
        if len(strides) != len(in_channels):
            raise ValueError(
                f"YOLOv8Head: {len(in_channels)} levels (in_channels) but {len(strides)} strides"
            )
        if not in_channels or num_classes < 1 or reg_max < 2:
            raise ValueError(
                f"YOLOv8Head: need >= 1 level, num_classes >= 1 and reg_max >= 2, got "
                f"in_channels={in_channels}, num_classes={num_classes}, reg_max={reg_max}"
            )
        self.num_classes, self.reg_max = int(num_classes), int(reg_max)
        box_ch = box_channels or max(16, in_channels[0] // 4, 4 * self.reg_max)
        cls_ch = class_channels or max(in_channels[0], min(self.num_classes, 100))
        self.box_branches = nn.ModuleList(
            _branch(box_branch, c, int(box_ch), 4 * self.reg_max, activation) for c in in_channels
        )
        self.class_branches = nn.ModuleList(
            _branch(class_branch, c, int(cls_ch), self.num_classes, activation) for c in in_channels
        )
        # Inference only: each level's branches as one stack (see merge_parallel_convs).
        self.merged_branches: nn.ModuleList | None = None
        height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
        for box, cls, stride in zip(self.box_branches, self.class_branches, strides, strict=True):
            nn.init.zeros_(box[-1].bias)
            cells = math.ceil(height / stride) * math.ceil(width / stride)
            prob = prior_prob or min(0.5, objects_per_image / (self.num_classes * cells))
            nn.init.constant_(cls[-1].bias, -math.log((1 - prob) / prob))

    def forward(self, features: Sequence[Tensor]) -> YOLOv8Output:
        if len(features) != len(self.box_branches):
            raise ValueError(
                f"YOLOv8Head expects {len(self.box_branches)} feature maps, got {len(features)}"
            )
        boxes, classes = [], []
        levels = self.merged_branches or zip(self.box_branches, self.class_branches, strict=True)
        for x, branches in zip(features, levels, strict=True):
            b, c = branches(x) if self.merged_branches else (branches[0](x), branches[1](x))
            batch, _, h, w = b.shape
            # [B, 4 R, H, W] -> [B, 4, R, H W] -> [B, H W, 4, R]
            boxes.append(b.view(batch, 4, self.reg_max, h * w).permute(0, 3, 1, 2))
            classes.append(c.flatten(2).transpose(1, 2))
        return YOLOv8Output(torch.cat(boxes, dim=1), torch.cat(classes, dim=1))

    def merge_parallel_convs(self) -> int:
        """Run each level's two branches as one stack of convolutions (see
        :func:`detkit.models.merging.merge_parallel_convs`): the first 3x3 convolutions read the
        same map (one convolution), the second ones and the predictors read their own halves
        of it (one grouped convolution and one block-diagonal 1x1 when the branches are equally
        wide; otherwise each branch's tail runs on its half). On the digits YOLO, 12
        convolutions become 6: the head 18-27% faster at batch 1, 17% at batch 8. Only
        ``"conv"`` branches with their BatchNorms folded; returns the levels merged."""
        if self.merged_branches is not None:
            return 0
        merged = [
            _MergedBranches.of(box, cls)
            for box, cls in zip(self.box_branches, self.class_branches, strict=True)
        ]
        if any(level is None for level in merged):
            return 0
        self.merged_branches = nn.ModuleList(merged)
        return len(merged)

    @staticmethod
    def scores(outputs: YOLOv8Output) -> Tensor:
        """``sigmoid(class logits) [B, P, C]``."""
        return outputs.class_logits.float().sigmoid()


BRANCHES = ("conv", "depthwise")


class _MergedBranches(nn.Module):
    """A level's box and classification branches (``"conv"`` kind, BatchNorms folded) run as
    one stack: ``forward(x) -> (box map, class map)``, views into one output."""

    def __init__(self, layers: nn.Sequential, splits: list[int], tails: nn.ModuleList | None):
        super().__init__()
        self.layers, self.splits, self.tails = layers, splits, tails

    @classmethod
    def of(cls, box: nn.Sequential, classes: nn.Sequential) -> _MergedBranches | None:
        convs = [layer for layer in (*box[:-1], *classes[:-1]) if isinstance(layer, ConvBNAct)]
        activations = {type(layer[2]) for layer in convs}
        if len(convs) != 4 or len(box) != 3 or len(classes) != 3 or len(activations) != 1:
            return None  # not two (3x3, 3x3, predictor) branches of one activation
        if not all(isinstance(layer[1], nn.Identity) for layer in convs):
            return None  # BatchNorms not folded
        activation = box[0][2]
        first = stacked_convs([box[0][0], classes[0][0]])
        second = side_by_side_convs([box[1][0], classes[1][0]])
        predictor = side_by_side_convs([box[2], classes[2]])
        if first is None:
            return None
        hidden = [box[0][0].out_channels, classes[0][0].out_channels]
        if second is None or predictor is None or second.groups != 2:
            # unequal widths: one first convolution, then each branch's own tail
            tails = nn.ModuleList([box[1:], classes[1:]])
            return cls(nn.Sequential(first, activation), hidden, tails)
        layers = nn.Sequential(first, activation, second, activation, predictor)
        return cls(layers, [box[2].out_channels, classes[2].out_channels], None)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        box, classes = self.layers(x).split(self.splits, dim=1)
        if self.tails is None:
            return box, classes
        return self.tails[0](box), self.tails[1](classes)


def _branch(kind: str, in_ch: int, hidden: int, out_ch: int, activation: str) -> nn.Sequential:
    """Two 3x3 ConvBNAct (or depthwise 3x3 + pointwise pairs) and a 1x1 predictor."""
    act = {"activation": activation}
    if kind == "conv":
        layers = [ConvBNAct(in_ch, hidden, 3, **act), ConvBNAct(hidden, hidden, 3, **act)]
    else:
        layers = [
            ConvBNAct(in_ch, in_ch, 3, groups=in_ch, **act), ConvBNAct(in_ch, hidden, 1, **act),
            ConvBNAct(hidden, hidden, 3, groups=hidden, **act), ConvBNAct(hidden, hidden, 1, **act),
        ]  # fmt: skip
    predictor = Pointwise(hidden, out_ch, 1)
    nn.init.normal_(predictor.weight, std=0.01)
    return nn.Sequential(*layers, predictor)
