"""Shared helpers for detkit's ``torch.library`` custom ops (namespace ``detkit``).

Stable API (used by boxes.py, nms.py and roi.py):

- :data:`NAMESPACE` - the op namespace, ``"detkit"``.
- :func:`upcast_float32` - half/bfloat16/integer tensors to float32 (float64 kept), because
  detkit computes IoU and NMS in float32 whatever the input precision.
- :func:`have_triton` - whether the Triton launchers can be imported.
- :func:`register_triton_cuda` - route an op's CUDA key to a launcher in
  :mod:`detkit.ops.kernels`, imported lazily so that importing detkit never needs triton.
- :func:`eager_cpu` - whether a call may skip the custom-op dispatcher.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from functools import cache
from typing import Any

import torch
from torch import Tensor

NAMESPACE = "detkit"

_HALF_TYPES = (torch.float16, torch.bfloat16)


def upcast_float32(tensor: Tensor) -> Tensor:
    """Return ``tensor`` as float32 if it is half, bfloat16 or integer; float32/64 unchanged."""
    if tensor.dtype in _HALF_TYPES or not tensor.is_floating_point():
        return tensor.float()
    return tensor


def eager_cpu(*tensors: Tensor) -> bool:
    """True for plain CPU tensors outside graph capture.

    A Python-registered custom op costs tens of microseconds of dispatch per call, which is
    what NMS on a few hundred boxes takes in all. Only graph capture (``torch.compile``,
    ``torch.export``, the ONNX exporter) needs the op: it traces with tensor subclasses (fake
    or functional tensors) or under dynamo, and then always goes through the op; the CUDA
    path does too (its kernel is registered on the op). Ops without gradients only.
    """
    if torch.compiler.is_compiling():
        return False
    return all(type(t) is Tensor and t.device.type == "cpu" for t in tensors)


@cache
def have_triton() -> bool:
    """True when triton imports (the CUDA paths need it; the CPU paths never do)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def load_launcher(module: str, name: str) -> Callable[..., Any]:
    """Import ``detkit.ops.kernels.<module>.<name>`` (raises a clear error without triton)."""
    if not have_triton():
        raise RuntimeError(
            f"detkit.ops: the CUDA path of {name!r} needs triton, which is not installed"
        )
    return getattr(importlib.import_module(f"detkit.ops.kernels.{module}"), name)


def register_triton_cuda(op: Any, module: str, name: str) -> None:
    """Register ``detkit.ops.kernels.<module>.<name>`` as the CUDA implementation of ``op``.

    ``op`` is a ``torch.library.custom_op`` object; the launcher must take the op's arguments.
    The import happens on first CUDA call, so CPU-only machines never import triton.
    """

    def cuda_impl(*args: Any, **kwargs: Any) -> Any:
        return load_launcher(module, name)(*args, **kwargs)

    op.register_kernel("cuda")(cuda_impl)
