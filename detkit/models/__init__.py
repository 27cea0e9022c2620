"""detkit detectors and their parts."""

from detkit.models.detectors.ssd import SSD

__all__ = ["SSD"]
