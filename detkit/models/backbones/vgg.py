"""VGG16 trunk of the SSD paper: conv4_3 (with L2Norm), fc6/fc7 as dilated convolutions, then
the extra layers; at 300x300 the six maps are 38, 19, 10, 5, 3 and 1 pixels wide.

Module names mirror torchvision's ``SSDFeatureExtractorVGG`` so weights move between the two
with a key rename (see :mod:`detkit.models.detectors.ssd`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detkit.models.backbones.extras import SSD300_EXTRAS, make_extras, xavier_init

# torchvision's VGG16 "D" layout; "C" is the max pool SSD switches to ceil mode (75 -> 38).
_VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "C", 512, 512, 512, "M", 512, 512, 512)
_CONV4_3_END = 23  # index in the VGG16 feature sequence just after relu4_3 (= maxpool4)


class L2Norm(nn.Module):
    """Channel-wise L2 normalisation with a learnable per-channel scale (ParseNet, SSD 3.1)."""

    def __init__(self, channels: int, scale: float = 20.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full((channels,), float(scale)))

    def forward(self, x: Tensor) -> Tensor:
        return self.weight.view(1, -1, 1, 1) * F.normalize(x, dim=1)


def _vgg16_layers() -> list[nn.Module]:
    layers: list[nn.Module] = []
    in_ch = 3
    for v in _VGG16_LAYOUT:
        if v in ("M", "C"):
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=v == "C"))
        else:
            layers += [nn.Conv2d(in_ch, v, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            in_ch = v
    return layers


def _fc6_fc7() -> nn.Sequential:
    fc = nn.Sequential(
        nn.MaxPool2d(kernel_size=3, stride=1, padding=1),  # pool5 kept at stride 1 (paper 3)
        nn.Conv2d(512, 1024, kernel_size=3, padding=6, dilation=6),  # fc6, atrous
        nn.ReLU(inplace=True),
        nn.Conv2d(1024, 1024, kernel_size=1),  # fc7
        nn.ReLU(inplace=True),
    )
    xavier_init(fc)
    return fc


class VGG16Backbone(nn.Module):
    """SSD300's VGG16 backbone returning six feature maps.

    Args:
        weights: ``None`` (random init) or a torchvision ``VGG16_Weights`` member/name such as
            ``"DEFAULT"`` or ``"IMAGENET1K_FEATURES"`` (downloaded by torchvision) whose
            convolution weights initialise conv1_1 .. conv5_3.
        l2norm_scale: initial scale of conv4_3's L2Norm.
    """

    def __init__(self, weights: str | None = None, l2norm_scale: float = 20.0) -> None:
        super().__init__()
        layers = _vgg16_layers()
        self.features = nn.Sequential(*layers[:_CONV4_3_END])  # conv1_1 .. relu4_3
        self.l2norm = L2Norm(512, l2norm_scale)
        conv5 = nn.Sequential(*layers[_CONV4_3_END:], _fc6_fc7())  # pool4, conv5_x, fc6, fc7
        extras, extra_channels = make_extras(1024, SSD300_EXTRAS)
        self.extra = nn.ModuleList([conv5, *extras])
        self.out_channels: list[int] = [512, 1024, *extra_channels]
        if weights is not None:
            self.load_torchvision_vgg16(weights)

    def load_torchvision_vgg16(self, weights: str) -> None:
        """Copy torchvision's pretrained VGG16 convolutions (downloads through torchvision)."""
        from torchvision.models import VGG16_Weights

        try:
            enum = VGG16_Weights.verify(weights)
        except (KeyError, ValueError, TypeError) as err:
            names = [w.name for w in VGG16_Weights]
            raise ValueError(f"backbone weights={weights!r} is not one of {names}") from err
        self.load_vgg16_features(enum.get_state_dict(progress=True))

    def load_vgg16_features(self, state: dict[str, Tensor]) -> None:
        """Load ``features.N.*`` entries of a torchvision VGG16 state dict."""
        ours: dict[str, Tensor] = {}
        for key, value in state.items():
            if not key.startswith("features."):
                continue
            idx, name = key.split(".")[1:]
            i = int(idx)
            if i < _CONV4_3_END:
                ours[f"features.{i}.{name}"] = value
            else:
                ours[f"extra.0.{i - _CONV4_3_END}.{name}"] = value
        missing = [k for k in ours if k not in self.state_dict()]
        if missing or not ours:
            raise ValueError(f"not a VGG16 features state dict (unexpected keys {missing[:3]})")
        self.load_state_dict(ours, strict=False)

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.features(x)
        outputs = [self.l2norm(x)]
        for block in self.extra:
            x = block(x)
            outputs.append(x)
        return outputs
