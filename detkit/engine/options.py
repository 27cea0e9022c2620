"""Reading the commands' own options (``detkit eval fuse_conv_bn=...``, ``export nms=...``)."""

from __future__ import annotations

from detkit.errors import UserError


def switch(cfg, name: str, default: bool) -> bool:
    """A true/false option of a command; anything else is the user's mistake, said in a line
    (a truthy word such as ``no`` would otherwise silently count as true)."""
    value = cfg.get(name, default)
    if not isinstance(value, bool):
        raise UserError(f"{name} must be true or false, got {value!r}")
    return value
