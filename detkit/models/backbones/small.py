"""A small, fast conv net (BatchNorm + ReLU) for SSD on CPU."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from detkit.models.backbones.extras import conv_bn_relu


class SmallBackbone(nn.Module):
    """Plain CNN returning one feature map per entry of ``level_channels``.

    The stem brings the image to stride 4; the first level is at stride 8 and every next level
    halves the map (3x3, stride 2), except the last ``valid_tail`` levels, which use a 3x3
    convolution without padding as SSD300's conv10_2/conv11_2 do (5 -> 3 -> 1). With the
    defaults a 300x300 image gives maps of 38, 19, 10, 5, 3 and 1 pixels, like VGG16-SSD300.

    Args:
        stem_channels: widths of the two stride-2 stem convolutions.
        level_channels: width of each output level.
        level_depth: convolutions per level (the first strides/shrinks, the rest keep size).
        valid_tail: how many final levels shrink by an unpadded 3x3 instead of stride 2.
        stem_depth: convolutions in the stem: the two stride-2 ones, then ``stem_depth - 2``
            more at stride 4 (3, the default, is one; 2 leaves it out, which saves about a
            sixth of the digits SSD's multiply-adds at 64x64 pixels).
    """

    def __init__(
        self,
        stem_channels: Sequence[int] = (16, 32),
        level_channels: Sequence[int] = (64, 96, 128, 128, 128, 128),
        level_depth: int | Sequence[int] = (2, 2, 1, 1, 1, 1),
        valid_tail: int = 2,
        stem_depth: int = 3,
    ) -> None:
        super().__init__()
        levels = len(level_channels)
        depths = [level_depth] * levels if isinstance(level_depth, int) else list(level_depth)
        if len(stem_channels) != 2:
            raise ValueError(f"stem_channels needs 2 widths, got {list(stem_channels)}")
        if stem_depth < 2:
            raise ValueError(f"stem_depth={stem_depth} must be >= 2 (the two stride-2 convs)")
        if len(depths) != levels or min(depths) < 1:
            raise ValueError(f"level_depth {level_depth} must give >= 1 conv for {levels} levels")
        if not 0 <= valid_tail < levels:
            raise ValueError(f"valid_tail={valid_tail} must be in [0, {levels - 1}]")
        s0, s1 = stem_channels
        refine = [conv_bn_relu(s1, s1) for _ in range(stem_depth - 2)]
        self.stem = nn.Sequential(
            conv_bn_relu(3, s0, stride=2), conv_bn_relu(s0, s1, stride=2), *refine
        )
        self.levels = nn.ModuleList()
        in_ch = s1
        for i, (out_ch, depth) in enumerate(zip(level_channels, depths, strict=True)):
            shrink_valid = i >= levels - valid_tail
            first = conv_bn_relu(
                in_ch, out_ch, stride=1 if shrink_valid else 2, padding=0 if shrink_valid else 1
            )
            rest = [conv_bn_relu(out_ch, out_ch) for _ in range(depth - 1)]
            self.levels.append(nn.Sequential(first, *rest))
            in_ch = out_ch
        self.out_channels: list[int] = [int(c) for c in level_channels]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.stem(x)
        outputs = []
        for level in self.levels:
            x = level(x)
            outputs.append(x)
        return outputs
