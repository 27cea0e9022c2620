"""torchvision classification trunks (MobileNetV3-Large, ResNet18) with SSD extra layers.

Both give six maps at 300x300 (38, 19, 10, 5, 3, 1), so they drop into the SSD300 prior
configuration. ``weights`` is a torchvision weights name (``"DEFAULT"``, ``"IMAGENET1K_V1"``...)
downloaded by torchvision, or ``None`` for random init.
"""

from __future__ import annotations

from torch import Tensor, nn

from detkit.models.backbones.extras import make_extras
from detkit.models.backbones.weights import verify_weights

# 10 -> 5 -> 3 -> 1, with BatchNorm since these trunks are BatchNorm nets.
_LIGHT_EXTRAS = ((256, 512, 2, 1), (128, 256, 1, 0), (128, 256, 1, 0))


class MobileNetV3Backbone(nn.Module):
    """MobileNetV3-Large at strides 8, 16 and 32 plus three extra blocks."""

    def __init__(self, weights: str | None = None) -> None:
        super().__init__()
        from torchvision.models import MobileNet_V3_Large_Weights, mobilenet_v3_large

        enum = verify_weights(MobileNet_V3_Large_Weights, weights, "MobileNetV3Backbone weights")
        features = mobilenet_v3_large(weights=enum).features
        # Indices where torchvision's MobileNetV3-Large changes stride: 7 (->16) and 13 (->32).
        self.stages = nn.ModuleList([features[:7], features[7:13], features[13:]])
        extras, extra_channels = make_extras(960, _LIGHT_EXTRAS, batch_norm=True)
        self.extra = extras
        self.out_channels: list[int] = [40, 112, 960, *extra_channels]

    def forward(self, x: Tensor) -> list[Tensor]:
        outputs = []
        for stage in [*self.stages, *self.extra]:
            x = stage(x)
            outputs.append(x)
        return outputs


class ResNet18Backbone(nn.Module):
    """ResNet18 ``layer2``/``layer3``/``layer4`` (strides 8, 16, 32) plus three extra blocks."""

    def __init__(self, weights: str | None = None) -> None:
        super().__init__()
        from torchvision.models import ResNet18_Weights, resnet18

        enum = verify_weights(ResNet18_Weights, weights, "ResNet18Backbone weights")
        net = resnet18(weights=enum)
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1)
        self.stages = nn.ModuleList([net.layer2, net.layer3, net.layer4])
        extras, extra_channels = make_extras(512, _LIGHT_EXTRAS, batch_norm=True)
        self.extra = extras
        self.out_channels: list[int] = [128, 256, 512, *extra_channels]

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.stem(x)
        outputs = []
        for stage in [*self.stages, *self.extra]:
            x = stage(x)
            outputs.append(x)
        return outputs
