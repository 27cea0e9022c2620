"""Triton launchers, one per kernel, each with the signature of the public op it accelerates.

Triton is optional: without it ``HAVE_TRITON`` is False and the launchers are absent, while
the rest of detkit imports and runs on its CPU paths. Under ``TRITON_INTERPRET=1`` the
launchers run on CPU tensors, which is how the tests check them on machines without a GPU.
(The matching layer's own kernel, fused prior matching, is :mod:`detkit.matching.fused_kernel`.)
"""

try:
    import triton  # noqa: F401

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - exercised only on machines without triton
    HAVE_TRITON = False

if HAVE_TRITON:
    from detkit.ops.kernels.boxes_nms import *  # noqa: F403
    from detkit.ops.kernels.roi import *  # noqa: F403
