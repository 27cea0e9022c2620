"""Checking the commands' own options (``eval fuse_conv_bn=``, ``export nms= tolerance=``,
``predict score_threshold= batch_size=``, ``data anchors k=``): each refused in one line
naming it. Hydra hands over what YAML parsed, so a word where a number or true/false belongs
arrives as a string, and ``bool``/``int``/``float`` would accept it silently or fail unnamed."""

from __future__ import annotations

import math

from detkit.errors import UserError


def switch(value: object, name: str) -> bool:
    """A true/false option (a truthy word such as ``no`` would otherwise count as true)."""
    if not isinstance(value, bool):
        raise UserError(f"{name} must be true or false, got {value!r}")
    return value


def positive_int(value: object, name: str, optional: bool = False) -> int | None:
    """A count: ``int`` but not ``bool``, at least 1 (``None`` too when ``optional``); a
    negative count would slice from the end, 0 fails deep inside."""
    if optional and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        alternative = " or null" if optional else ""
        raise UserError(f"{name} must be a positive integer{alternative}, got {value!r}")
    return value


def number(value: object, name: str, low: float, high: float | None = None) -> float:
    """A number in ``[low, high]`` (``>= low`` without ``high``); NaN and ``bool`` refused."""
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    if not is_number or math.isnan(value) or value < low or (high is not None and value > high):
        bounds = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise UserError(f"{name} must be a number {bounds}, got {value!r}")
    return float(value)
