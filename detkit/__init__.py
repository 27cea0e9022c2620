"""detkit: object detection from small, swappable parts."""

__version__ = "0.1.0"
