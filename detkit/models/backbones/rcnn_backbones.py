"""Faster R-CNN backbones: each returns a list of feature maps (finest first) and exposes
``out_channels: list[int]``.

- :class:`VGG16C5Backbone`: the paper's VGG16 up to conv5_3 (one map at stride 16).
- :class:`ResNetFPNBackbone`, :class:`MobileNetV3FPNBackbone`: torchvision trunks with an FPN,
  built the way ``torchvision.models.detection`` builds them (same module names, frozen
  layers and norm layers), so torchvision detectors' weights load as they are.
- :class:`WithFPN`: any multi-map backbone (e.g. the light CPU ``SmallBackbone``) plus an FPN.

``weights`` is a torchvision weights name (``"DEFAULT"``, ``"IMAGENET1K_V1"``...) downloaded by
torchvision, or ``None`` for random init.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from torch import Tensor, nn

from detkit.models.backbones.weights import verify_weights
from detkit.models.necks.fpn import FeaturePyramidNetwork


def _norm_layer(norm: str | None, pretrained: bool):
    """torchvision freezes BatchNorm statistics when starting from pretrained weights."""
    from torchvision.ops import FrozenBatchNorm2d

    choice = norm or ("frozen" if pretrained else "batch")
    if choice not in ("frozen", "batch"):
        raise ValueError(f"norm must be 'frozen', 'batch' or None (auto), got {norm!r}")
    return FrozenBatchNorm2d if choice == "frozen" else nn.BatchNorm2d


class LayerGetter(nn.ModuleDict):
    """Runs named children in order and returns the outputs of ``return_names`` (in order).

    Same module names as torchvision's ``IntermediateLayerGetter``; children after the last
    returned one are dropped.
    """

    def __init__(self, children: Iterable[tuple[str, nn.Module]], return_names: Sequence[str]):
        wanted, kept = set(return_names), []
        for name, module in children:
            kept.append((name, module))
            wanted.discard(name)
            if not wanted:
                break
        if wanted:
            raise ValueError(f"return layers {sorted(wanted)} are not children of the trunk")
        super().__init__(kept)
        self.return_names = list(return_names)

    def forward(self, x: Tensor) -> list[Tensor]:
        outputs = {}
        for name, module in self.items():
            x = module(x)
            if name in self.return_names:
                outputs[name] = x
        return [outputs[n] for n in self.return_names]


class VGG16C5Backbone(nn.Module):
    """VGG16 conv1_1 .. relu5_3 (stride 16, 512 channels), the paper's shared conv layers.

    Args:
        weights: torchvision ``VGG16_Weights`` name or ``None``.
        frozen_convs: leading conv layers kept fixed (the paper fine-tunes from conv3_1: 4).
            Only applied with pretrained weights.
    """

    def __init__(self, weights: str | None = None, frozen_convs: int = 4) -> None:
        super().__init__()
        from torchvision.models import VGG16_Weights, vgg16

        enum = verify_weights(VGG16_Weights, weights, "VGG16C5Backbone weights")
        self.features = vgg16(weights=enum).features[:30]  # drop pool5
        if enum is not None:
            convs = [m for m in self.features if isinstance(m, nn.Conv2d)]
            for conv in convs[:frozen_convs]:
                conv.requires_grad_(False)
        self.out_channels: list[int] = [512]

    def forward(self, x: Tensor) -> list[Tensor]:
        return [self.features(x)]


class ResNetFPNBackbone(nn.Module):
    """ResNet (C2..C5) + FPN + max-pooled P6, as ``resnet_fpn_backbone`` / torchvision's
    ``fasterrcnn_resnet50_fpn`` build it.

    Args:
        depth: 18, 34, 50 or 101.
        weights: torchvision weights name for that ResNet, or ``None``.
        trainable_layers: how many stages (from layer4 down to conv1) are trained (0..5).
        returned_layers: which of layer1..layer4 feed the FPN.
        out_channels: FPN width.
        norm: ``"frozen"`` (FrozenBatchNorm2d), ``"batch"``, or ``None`` = frozen iff pretrained.
    """

    def __init__(
        self,
        depth: int = 50,
        weights: str | None = None,
        trainable_layers: int = 3,
        returned_layers: Sequence[int] = (1, 2, 3, 4),
        out_channels: int = 256,
        norm: str | None = None,
    ) -> None:
        super().__init__()
        from torchvision.models import resnet

        if depth not in (18, 34, 50, 101):
            raise ValueError(f"ResNetFPNBackbone depth must be 18, 34, 50 or 101, got {depth}")
        if not 0 <= trainable_layers <= 5:
            raise ValueError(f"trainable_layers must be in [0, 5], got {trainable_layers}")
        enum_cls = getattr(resnet, f"ResNet{depth}_Weights")
        enum = verify_weights(enum_cls, weights, "ResNetFPNBackbone weights")
        net = getattr(resnet, f"resnet{depth}")(
            weights=enum, norm_layer=_norm_layer(norm, enum is not None)
        )
        to_train = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
        if trainable_layers == 5:
            to_train.append("bn1")
        for name, parameter in net.named_parameters():
            if not any(name.startswith(layer) for layer in to_train):
                parameter.requires_grad_(False)
        names = [f"layer{k}" for k in returned_layers]
        self.body = LayerGetter(net.named_children(), names)
        width = net.inplanes // 8  # channels of layer1's output (64 or 256)
        in_channels = [width * 2 ** (k - 1) for k in returned_layers]
        self.fpn = FeaturePyramidNetwork(in_channels, out_channels, extra_pool=True)
        self.out_channels: list[int] = self.fpn.out_channels

    def forward(self, x: Tensor) -> list[Tensor]:
        return self.fpn(self.body(x))


class MobileNetV3FPNBackbone(nn.Module):
    """MobileNetV3-Large's last two stages + FPN + max-pooled level, as torchvision's
    ``fasterrcnn_mobilenet_v3_large_fpn`` builds it (``_mobilenet_extractor``).

    Args:
        weights: torchvision ``MobileNet_V3_Large_Weights`` name or ``None``.
        trainable_layers: trained stages counted from the top (0..6).
        out_channels: FPN width.
        norm: ``"frozen"``, ``"batch"`` or ``None`` = frozen iff pretrained.
    """

    def __init__(
        self,
        weights: str | None = None,
        trainable_layers: int = 3,
        out_channels: int = 256,
        norm: str | None = None,
    ) -> None:
        super().__init__()
        from torchvision.models import MobileNet_V3_Large_Weights, mobilenet_v3_large

        enum = verify_weights(MobileNet_V3_Large_Weights, weights, "MobileNetV3FPNBackbone weights")
        features = mobilenet_v3_large(
            weights=enum, norm_layer=_norm_layer(norm, enum is not None)
        ).features
        stages = [0] + [i for i, b in enumerate(features) if getattr(b, "_is_cn", False)]
        stages.append(len(features) - 1)
        if not 0 <= trainable_layers <= len(stages):
            raise ValueError(f"trainable_layers must be in [0, {len(stages)}]")
        freeze_before = (
            len(features) if trainable_layers == 0 else stages[len(stages) - trainable_layers]
        )
        for block in features[:freeze_before]:
            block.requires_grad_(False)
        returned = stages[-2:]
        self.body = LayerGetter(features.named_children(), [str(i) for i in returned])
        in_channels = [features[i].out_channels for i in returned]
        self.fpn = FeaturePyramidNetwork(in_channels, out_channels, extra_pool=True)
        self.out_channels: list[int] = self.fpn.out_channels

    def forward(self, x: Tensor) -> list[Tensor]:
        return self.fpn(self.body(x))


class WithFPN(nn.Module):
    """``body`` (returns a list of maps and has ``out_channels``) followed by an FPN.

    Args:
        body: the trunk, e.g. :class:`detkit.models.backbones.small.SmallBackbone`.
        out_channels: FPN width.
        extra_pool: add the max-pooled coarsest level.
    """

    def __init__(self, body: nn.Module, out_channels: int = 64, extra_pool: bool = False) -> None:
        super().__init__()
        channels = list(getattr(body, "out_channels", []))
        if not channels:
            raise ValueError("WithFPN body must expose out_channels: list[int]")
        self.body = body
        self.fpn = FeaturePyramidNetwork(channels, out_channels, extra_pool)
        self.out_channels: list[int] = self.fpn.out_channels

    def forward(self, x: Tensor) -> list[Tensor]:
        return self.fpn(self.body(x))
