"""Backbones for SSD: each returns a list of feature maps and exposes ``out_channels``."""

from detkit.models.backbones.small import SmallBackbone
from detkit.models.backbones.torchvision_trunks import MobileNetV3Backbone, ResNet18Backbone
from detkit.models.backbones.vgg import L2Norm, VGG16Backbone

__all__ = ["L2Norm", "MobileNetV3Backbone", "ResNet18Backbone", "SmallBackbone", "VGG16Backbone"]
