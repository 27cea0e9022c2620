"""Detection heads."""

from detkit.models.heads.ssd import SSDHead

__all__ = ["SSDHead"]
