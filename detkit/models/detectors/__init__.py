"""Detectors: composition of backbone, head, priors/anchors, loss and post-processing."""

from detkit.models.detectors.ssd import SSD

__all__ = ["SSD"]
