"""Backbones: map sizes/channels, L2Norm, and VGG16 weights loaded from torchvision's layout."""

import pytest
import torch
import torch.nn.functional as F
from torchvision.models.vgg import cfgs, make_layers

from detkit.models.backbones import (
    L2Norm,
    MobileNetV3Backbone,
    ResNet18Backbone,
    SmallBackbone,
    VGG16Backbone,
)

SSD300_SIZES = [38, 19, 10, 5, 3, 1]


def _sizes(maps):
    return [tuple(m.shape[-2:]) for m in maps]


@torch.no_grad()
def test_vgg16_gives_ssd300_maps_and_channels():
    net = VGG16Backbone().eval()
    maps = net(torch.rand(1, 3, 300, 300))
    assert _sizes(maps) == [(s, s) for s in SSD300_SIZES]
    assert [m.shape[1] for m in maps] == net.out_channels == [512, 1024, 512, 256, 256, 256]


@pytest.mark.parametrize("cls", [SmallBackbone, MobileNetV3Backbone, ResNet18Backbone])
@torch.no_grad()
def test_light_backbones_match_ssd300_map_sizes(cls):
    net = cls().eval()
    maps = net(torch.rand(1, 3, 300, 300))
    assert _sizes(maps) == [(s, s) for s in SSD300_SIZES]
    assert [m.shape[1] for m in maps] == net.out_channels


def test_small_backbone_levels_follow_config_and_train_mode_backward():
    net = SmallBackbone(level_channels=(8, 16, 24, 24), level_depth=1, valid_tail=0)
    maps = net(torch.rand(2, 3, 256, 256))
    assert _sizes(maps) == [(32, 32), (16, 16), (8, 8), (4, 4)]
    assert net.out_channels == [8, 16, 24, 24]
    sum(m.mean() for m in maps).backward()
    assert net.stem[0][0].weight.grad is not None


def test_small_backbone_stem_depth_sets_the_convs_at_stride_4():
    convs = [SmallBackbone(level_channels=(8, 8), level_depth=1, valid_tail=0, stem_depth=d)
             for d in (2, 3, 5)]  # fmt: skip
    assert [len(net.stem) for net in convs] == [2, 3, 5]
    x = torch.rand(1, 3, 64, 64)
    for net in convs:  # the same strides whatever the depth
        assert _sizes(net(x)) == [(8, 8), (4, 4)]
    with pytest.raises(ValueError, match="stem_depth"):
        SmallBackbone(level_channels=(8, 8), level_depth=1, valid_tail=0, stem_depth=1)


def test_small_backbone_rejects_bad_config():
    with pytest.raises(ValueError, match="valid_tail"):
        SmallBackbone(level_channels=(8, 8), level_depth=1, valid_tail=2)
    with pytest.raises(ValueError, match="level_depth"):
        SmallBackbone(level_channels=(8, 8), level_depth=(1,), valid_tail=0)


def test_l2norm_scales_unit_channel_vectors():
    norm = L2Norm(4, scale=20.0)
    x = torch.randn(2, 4, 3, 3)
    y = norm(x)
    torch.testing.assert_close(y.norm(dim=1), torch.full((2, 3, 3), 20.0))
    torch.testing.assert_close(y, 20.0 * F.normalize(x, dim=1))
    assert norm.weight.requires_grad


@torch.no_grad()
def test_vgg16_loads_torchvision_feature_weights():
    tv_features = make_layers(cfgs["D"], batch_norm=False).eval()  # torchvision's VGG16 layout
    tv_features[16].ceil_mode = True  # SSD's pool3, as torchvision's SSD patches it
    state = {f"features.{k}": v for k, v in tv_features.state_dict().items()}
    net = VGG16Backbone().eval()
    net.load_vgg16_features(state)
    x = torch.rand(1, 3, 300, 300)
    conv4_3 = tv_features[:23](x)
    torch.testing.assert_close(net.features(x), conv4_3)
    torch.testing.assert_close(net.extra[0][:7](conv4_3), tv_features[23:30](conv4_3))


def test_backbone_weights_name_is_checked():
    with pytest.raises(ValueError, match="weights"):
        VGG16Backbone(weights="NOT_A_WEIGHT")
