"""Necks: modules between a backbone's maps and the heads."""

from detkit.models.necks.fpn import FeaturePyramidNetwork

__all__ = ["FeaturePyramidNetwork"]
