"""torchvision pretrained-weight names as backbones accept them in configs."""

from __future__ import annotations


def verify_weights(enum_cls, weights: str | None, arg: str):
    """The ``enum_cls`` member named ``weights`` (None stays None); a clear error otherwise."""
    if weights is None:
        return None
    try:
        return enum_cls.verify(weights)
    except (KeyError, ValueError, TypeError) as err:
        names = [w.name for w in enum_cls]
        raise ValueError(f"{arg}={weights!r} is not one of {names}") from err
