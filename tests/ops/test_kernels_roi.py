"""The RoI Triton kernels run on CPU tensors (TRITON_INTERPRET=1, set in tests/conftest.py)
against the CPU path, i.e. torchvision's compiled kernels. Sizes are tiny: the interpreter
executes each program in Python."""

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from detkit.ops import kernels  # noqa: E402
from detkit.ops.roi import roi_align, roi_pool  # noqa: E402

N, C, H, W = 2, 3, 11, 13


def small_rois(spatial_scale=1.0, seed=0):
    """Four random rois (some sticking out of the map) plus the awkward ones; all small, as
    the interpreter's time grows with the number of sampling points."""
    g = torch.Generator().manual_seed(seed)
    size = torch.tensor([W, H]) / spatial_scale
    xy1 = torch.rand(4, 2, generator=g) * size * 1.2 - 0.1 * size
    wh = torch.rand(4, 2, generator=g) * size * 0.4
    batch = torch.randint(0, N, (4, 1), generator=g).float()
    awkward = torch.tensor(
        [
            [0, -9.0, -7.0, -2.0, -1.0],  # outside the map
            [1, 4.0, 3.0, 4.0, 3.0],  # zero size
            [0, 7.0, 6.0, 2.0, 1.0],  # inverted
            [1, 0.5, 0.5, 2.5, 1.5],  # half-pixel corners
        ]
    ) / torch.tensor([1.0, spatial_scale, spatial_scale, spatial_scale, spatial_scale])
    return torch.cat([torch.cat([batch, xy1, xy1 + wh], dim=1), awkward])


def align_backward_args(rois, params, grad):
    spatial_scale, ph, pw, sampling_ratio, aligned = params
    return (grad, rois, spatial_scale, ph, pw, N, C, H, W, sampling_ratio, aligned)


@pytest.mark.parametrize(
    "params",  # spatial_scale, pooled_h, pooled_w, sampling_ratio, aligned
    [(1.0, 3, 2, -1, False), (0.25, 2, 3, 2, True), (0.5, 2, 2, -1, True), (1 / 3, 3, 3, 1, False)],
)
def test_roi_align_kernels_match_cpu_path(params):
    x = torch.randn(N, C, H, W)
    rois = small_rois(params[0])
    out = kernels.roi_align_forward(x, rois, *params)
    ref = torch.ops.torchvision.roi_align(x, rois, *params)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)  # same arithmetic, same bits
    grad = torch.randn_like(ref)
    grad_in = kernels.roi_align_backward(*align_backward_args(rois, params, grad))
    ref_in = torch.ops.torchvision._roi_align_backward(*align_backward_args(rois, params, grad))
    torch.testing.assert_close(grad_in, ref_in, rtol=1e-5, atol=1e-6)  # atomic-add order


@pytest.mark.parametrize("spatial_scale", [1.0, 1 / 3])
def test_roi_pool_kernels_match_cpu_path(spatial_scale):
    x = torch.randn(N, C, H, W)
    x[0, :, 2:6, 3:7] = 2.5  # a plateau: ties must resolve to torchvision's first maximum
    rois = small_rois(spatial_scale, seed=1)
    out, argmax = kernels.roi_pool_forward(x, rois, spatial_scale, 3, 2)
    ref, ref_argmax = torch.ops.torchvision.roi_pool(x, rois, spatial_scale, 3, 2)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert torch.equal(argmax, ref_argmax)
    assert (argmax == -1).any(), "the awkward rois should leave some bins empty"
    grad = torch.randn_like(ref)
    args = (grad, rois, argmax, spatial_scale, 3, 2, N, C, H, W)
    torch.testing.assert_close(
        kernels.roi_pool_backward(*args), torch.ops.torchvision._roi_pool_backward(*args)
    )


def test_float64_kernels_match_cpu_path():
    x = torch.randn(N, C, H, W, dtype=torch.float64)
    rois = small_rois(0.5).double()
    params = (0.5, 2, 2, -1, True)
    ref = torch.ops.torchvision.roi_align(x, rois, *params)
    torch.testing.assert_close(kernels.roi_align_forward(x, rois, *params), ref, rtol=0, atol=0)
    out, argmax = kernels.roi_pool_forward(x, rois, 0.5, 2, 2)
    ref, ref_argmax = torch.ops.torchvision.roi_pool(x, rois, 0.5, 2, 2)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert torch.equal(argmax, ref_argmax)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_kernels_compute_in_float32_like_the_cpu_path(dtype):
    x = torch.randn(N, C, H, W).to(dtype)
    rois = small_rois().to(dtype)
    params = (1.0, 2, 2, 2, False)
    out = kernels.roi_align_forward(x, rois, *params)
    assert out.dtype == dtype
    # The interpreter truncates float32 -> bfloat16 casts (a GPU rounds to nearest): 1 ulp.
    exact = {"rtol": 0, "atol": 0} if dtype == torch.float16 else {"rtol": 2**-7, "atol": 0}
    torch.testing.assert_close(out, torch.ops.detkit.roi_align(x, rois, *params), **exact)
    grad = torch.randn(out.shape).to(dtype)
    grad_in = kernels.roi_align_backward(*align_backward_args(rois, params, grad))
    ref_in = torch.ops.detkit._roi_align_backward(*align_backward_args(rois, params, grad))
    assert grad_in.dtype == dtype
    torch.testing.assert_close(grad_in, ref_in)
    pooled, argmax = kernels.roi_pool_forward(x, rois, 1.0, 2, 2)
    ref, ref_argmax = torch.ops.detkit.roi_pool(x, rois, 1.0, 2, 2)
    torch.testing.assert_close(pooled, ref, rtol=0, atol=0)
    assert torch.equal(argmax, ref_argmax)


def test_public_signature_launchers_and_empty_inputs():
    x = torch.randn(N, C, H, W)
    boxes = [small_rois()[:3, 1:], small_rois(seed=2)[:2, 1:]]
    torch.testing.assert_close(
        kernels.roi_align(x, boxes, (2, 3), 1.0, 2, True), roi_align(x, boxes, (2, 3), 1.0, 2, True)
    )
    torch.testing.assert_close(kernels.roi_pool(x, boxes, 2), roi_pool(x, boxes, 2))
    empty = torch.zeros(0, 5)
    assert kernels.roi_align(x, empty, 2).shape == (0, C, 2, 2)
    assert kernels.roi_pool(x, empty, 2).shape == (0, C, 2, 2)
    grad = kernels.roi_align_backward(torch.zeros(0, C, 2, 2), empty, 1.0, 2, 2, N, C, H, W, -1, 0)
    assert torch.equal(grad, torch.zeros(N, C, H, W))


_COMPILE_FOR_SM80 = """
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile
from detkit.ops.kernels import roi as k

def build(kernel, pointers, **constexprs):
    sig = {n: "constexpr" if n in constexprs else "i32" for n in kernel.arg_names}
    sig.update(zip(kernel.arg_names, pointers))
    compile(ASTSource(kernel, sig, constexprs), target=GPUTarget("cuda", 80, 32))

common = dict(N=1, SPATIAL_SCALE=0.0625, BLOCK_C=16, BLOCK_P=64)
for backward in (False, True):
    build(k._roi_align_kernel, ["*bf16", "*fp32", "*fp32"], PW=1, SAMPLING=1, ALIGNED=True,
          IS_F64=False, BACKWARD=backward, **common)
build(k._roi_pool_fwd_kernel, ["*fp16", "*fp32", "*fp16", "*i32"], IS_F64=False, **common)
build(k._roi_pool_bwd_kernel, ["*fp64", "*fp64", "*i32", "*fp64"], N=1, BLOCK_C=16, BLOCK_P=64)
print("compiled")
"""


def test_kernels_compile_for_a_real_gpu():
    # The interpreter is more lenient than the compiler: build the kernels for sm_80 (PTX and
    # cubin through triton's bundled ptxas; no GPU needed), with batch size, pooled width and
    # sampling ratio specialised to 1 as a launch with those values would. A subprocess, since
    # this process runs triton in interpreter mode.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-c", _COMPILE_FOR_SM80], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]
