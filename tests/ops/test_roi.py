"""detkit.ops.roi_align / roi_pool (CPU path) against torchvision.ops, the oracle."""

import pytest
import torch
import torchvision.ops as tvops

from detkit.ops import roi_align, roi_cpu, roi_pool


def random_rois(num, num_images, height, width, spatial_scale=1.0, seed=0):
    """[K, 5] rois in image pixels for a feature map of (height, width); some stick out."""
    g = torch.Generator().manual_seed(seed)
    size = torch.tensor([width, height]) / spatial_scale
    xy1 = torch.rand(num, 2, generator=g) * size * 1.2 - 0.1 * size
    wh = torch.rand(num, 2, generator=g) * size * 0.6
    batch = torch.randint(0, num_images, (num, 1), generator=g).float()
    return torch.cat([batch, xy1, xy1 + wh], dim=1)


def edge_rois(height, width):
    """Boxes outside the map, zero-size, inverted, sub-pixel and covering the whole map."""
    return torch.tensor(
        [
            [0, -30.0, -20.0, -5.0, -3.0],  # fully outside (top-left)
            [1, width + 3.0, height + 1.0, width + 20.0, height + 9.0],  # outside bottom-right
            [0, 4.0, 3.0, 4.0, 3.0],  # zero size
            [1, 7.0, 6.0, 2.0, 1.0],  # inverted
            [0, 2.2, 3.7, 2.6, 4.1],  # sub-pixel
            [1, 0.0, 0.0, width - 1.0, height - 1.0],  # the whole map
            [0, -4.0, 2.0, width + 4.0, 5.0],  # straddles both sides
            [1, 0.5, 0.5, 1.5, 1.5],  # half-pixel corners (rounding in roi_pool)
        ]
    )


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 2])
@pytest.mark.parametrize("spatial_scale", [1.0, 1 / 16])
def test_roi_align_forward_backward_equal_torchvision(aligned, sampling_ratio, spatial_scale):
    x = torch.randn(2, 4, 12, 15, requires_grad=True)
    rois = torch.cat([random_rois(20, 2, 12, 15, spatial_scale), edge_rois(12, 15)])
    args = ((5, 4), spatial_scale, sampling_ratio, aligned)
    ours = roi_align(x, rois, *args)
    ref = tvops.roi_align(x, rois, *args)
    grad = torch.randn_like(ref)
    (ours_grad,) = torch.autograd.grad(ours, x, grad)
    (ref_grad,) = torch.autograd.grad(ref, x, grad)
    if sampling_ratio <= 0:  # torchvision's own kernels: bit for bit
        torch.testing.assert_close(ours, ref, rtol=0, atol=0)
        torch.testing.assert_close(ours_grad, ref_grad, rtol=0, atol=0)
    else:  # weighted row sums and the sparse product add the same taps in another order
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours_grad, ref_grad, rtol=1e-5, atol=1e-5)
        x64, rois64, grad64 = x.detach().double().requires_grad_(True), rois.double(), grad.double()
        out64, ref_out64 = roi_align(x64, rois64, *args), tvops.roi_align(x64, rois64, *args)
        torch.testing.assert_close(out64, ref_out64, rtol=0, atol=1e-12)
        (ours64,) = torch.autograd.grad(out64, x64, grad64)
        (ref64,) = torch.autograd.grad(ref_out64, x64, grad64)
        torch.testing.assert_close(ours64, ref64, rtol=0, atol=1e-12)


@pytest.mark.parametrize("block_rois", [None, 40, 100])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("batch", [1, 3])
def test_roi_align_forward_over_several_chunks_equals_torchvision(
    layout, batch, block_rois, monkeypatch
):
    """More RoIs than one chunk of the CPU forward holds (256 channels x 7 x 7 bins: 31), in
    one block of taps or several (a block of 40 holds one chunk, of 100 three), one image
    (whose NHWC view of NCHW features is strided) or several, NCHW or channels-last features:
    torchvision's values, in float64."""
    if block_rois is not None:
        monkeypatch.setattr(roi_cpu, "_BLOCK_ROIS", block_rois)
    x = torch.randn(batch, 256, 10, 13, dtype=torch.float64)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    rois = torch.cat([random_rois(70, batch, 10, 13, 1 / 8), edge_rois(10, 13)]).double()
    rois[:, 0] = rois[:, 0].clamp(max=batch - 1)
    ours = roi_align(x, rois, 7, 1 / 8, 2, False)
    assert ours.is_contiguous()
    torch.testing.assert_close(
        ours, tvops.roi_align(x, rois, 7, 1 / 8, 2, False), rtol=0, atol=1e-12
    )


def test_roi_align_sparse_backward_on_a_detector_sized_input():
    """Many overlapping RoIs over several images, 7x7 bins, 2x2 samples (Faster R-CNN's
    settings): the sparse backward against torchvision's kernel, in float64."""
    x = torch.randn(3, 16, 25, 38, dtype=torch.float64, requires_grad=True)
    rois = random_rois(300, 3, 25, 38, 1 / 8).double()
    out = roi_align(x, rois, 7, 1 / 8, 2, False)
    grad = torch.randn_like(out)
    (ours,) = torch.autograd.grad(out, x, grad)
    (ref,) = torch.autograd.grad(tvops.roi_align(x, rois, 7, 1 / 8, 2, False), x, grad)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-11)


@pytest.mark.parametrize("spatial_scale", [1.0, 0.5, 1 / 16])
def test_roi_pool_forward_backward_equal_torchvision(spatial_scale):
    x = torch.randn(2, 3, 13, 11, requires_grad=True)
    rois = torch.cat([random_rois(20, 2, 13, 11, spatial_scale), edge_rois(13, 11)])
    ours = roi_pool(x, rois, (3, 4), spatial_scale)
    ref = tvops.roi_pool(x, rois, (3, 4), spatial_scale)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    assert (ours == 0).any(), "edge rois should produce empty bins (output 0)"
    grad = torch.randn_like(ref)
    (ours_grad,) = torch.autograd.grad(ours, x, grad)
    (ref_grad,) = torch.autograd.grad(ref, x, grad)
    torch.testing.assert_close(ours_grad, ref_grad, rtol=0, atol=0)


def test_roi_pool_ties_pick_the_same_argmax_as_torchvision():
    x = torch.zeros(1, 2, 6, 6)
    x[:, :, 1:4, 1:4] = 1.0  # a plateau: many equal maxima per bin
    x.requires_grad_(True)
    rois = torch.tensor([[0, 0.0, 0.0, 5.0, 5.0], [0, 1.0, 1.0, 3.0, 3.0]])
    (ours_grad,) = torch.autograd.grad(roi_pool(x, rois, 2).sum(), x)
    (ref_grad,) = torch.autograd.grad(tvops.roi_pool(x, rois, 2).sum(), x)
    torch.testing.assert_close(ours_grad, ref_grad, rtol=0, atol=0)


def test_list_of_boxes_and_int_output_size_equal_torchvision():
    x = torch.randn(3, 2, 10, 10)
    boxes = [random_rois(4, 1, 10, 10, seed=i)[:, 1:] for i in range(3)]
    boxes[1] = boxes[1][:0]  # an image without boxes
    torch.testing.assert_close(roi_align(x, boxes, 3), tvops.roi_align(x, boxes, 3))
    torch.testing.assert_close(roi_pool(x, boxes, 3), tvops.roi_pool(x, boxes, 3))
    assert roi_align(x, boxes, 3).shape == (8, 2, 3, 3)


def test_empty_boxes_give_empty_output_and_zero_gradient():
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    rois = torch.zeros(0, 5)
    for op in (roi_align, roi_pool):
        out = op(x, rois, (2, 3))
        assert out.shape == (0, 3, 2, 3)
        (grad,) = torch.autograd.grad(out.sum(), x)
        assert torch.equal(grad, torch.zeros_like(x))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_are_computed_in_float32(dtype):
    # torchvision's CPU kernels compute float16 in float16 and reject bfloat16; detkit computes
    # in float32 and returns the input dtype.
    x = torch.randn(2, 3, 12, 12).to(dtype)
    rois = random_rois(10, 2, 12, 12).to(dtype)
    x32, rois32 = x.float(), rois.float()
    ours = roi_align(x, rois, 4, 1.0, 2, True)
    assert ours.dtype == dtype
    torch.testing.assert_close(ours, tvops.roi_align(x32, rois32, 4, 1.0, 2, True).to(dtype))
    pooled = roi_pool(x, rois, 4)
    assert pooled.dtype == dtype
    torch.testing.assert_close(pooled, tvops.roi_pool(x32, rois32, 4).to(dtype))
    if dtype == torch.float16:  # float16 computed in float16 is close to it
        ref = tvops.roi_align(x, rois, 4, 1.0, 2, True)
        torch.testing.assert_close(ours, ref, rtol=1e-2, atol=1e-2)
    x.requires_grad_(True)
    (grad,) = torch.autograd.grad(roi_align(x, rois, 4, 1.0, 2, True).sum(), x)
    x32.requires_grad_(True)
    (ref_grad,) = torch.autograd.grad(tvops.roi_align(x32, rois32, 4, 1.0, 2, True).sum(), x32)
    assert grad.dtype == dtype
    torch.testing.assert_close(grad, ref_grad.to(dtype))


def test_float64_equal_torchvision():
    x = torch.randn(1, 2, 9, 9, dtype=torch.float64)
    rois = random_rois(8, 1, 9, 9).double()
    torch.testing.assert_close(roi_align(x, rois, 3, 0.5), tvops.roi_align(x, rois, 3, 0.5))
    torch.testing.assert_close(roi_pool(x, rois, 3, 0.5), tvops.roi_pool(x, rois, 3, 0.5))


@pytest.mark.parametrize("aligned", [False, True])
def test_roi_align_gradcheck(aligned):
    x = torch.randn(1, 2, 6, 7, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor([[0, 0.3, 1.1, 4.2, 5.3], [0, 2.0, 0.5, 6.5, 3.7]], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: roi_align(t, rois, 2, 1.0, 2, aligned), (x,))


def test_roi_pool_gradcheck():
    # distinct values spaced well beyond gradcheck's eps, so no bin's argmax can flip
    x = (torch.randperm(84, dtype=torch.float64) / 10).reshape(1, 2, 6, 7).requires_grad_(True)
    rois = torch.tensor([[0, 0.0, 1.0, 4.0, 5.0], [0, 2.0, 0.0, 6.0, 3.0]], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: roi_pool(t, rois, 2), (x,))


def test_opcheck_every_custom_op():
    x = torch.randn(2, 3, 8, 9, requires_grad=True)
    rois = torch.cat([random_rois(5, 2, 8, 9), edge_rois(8, 9)])
    torch.library.opcheck(torch.ops.detkit.roi_align.default, (x, rois, 0.5, 2, 3, -1, True))
    torch.library.opcheck(torch.ops.detkit.roi_align.default, (x, rois, 1.0, 3, 3, 2, False))
    torch.library.opcheck(torch.ops.detkit.roi_pool.default, (x, rois, 0.5, 2, 3))
    grad = torch.randn(rois.shape[0], 3, 2, 3)
    args = (grad, rois, 1.0, 2, 3, 2, 3, 8, 9, -1, False)
    torch.library.opcheck(torch.ops.detkit._roi_align_backward.default, args)
    _, argmax = torch.ops.detkit.roi_pool(x.detach(), rois, 1.0, 2, 3)
    args = (grad, rois, argmax, 1.0, 2, 3, 2, 3, 8, 9)
    torch.library.opcheck(torch.ops.detkit._roi_pool_backward.default, args)


def test_torch_compile_fullgraph_forward_and_backward():
    def pool_features(x, rois):
        return roi_align(x, rois, (3, 2), 0.5, -1, True).sum() + roi_pool(x, rois, 2, 0.5).sum()

    x = torch.randn(2, 3, 10, 10, requires_grad=True)
    rois = random_rois(6, 2, 10, 10, 0.5)
    # aot_eager traces the fake impls and the registered autograd without a C++ build
    compiled = torch.compile(pool_features, fullgraph=True, backend="aot_eager")
    out = compiled(x, rois)
    (grad,) = torch.autograd.grad(out, x)
    ref = (
        tvops.roi_align(x, rois, (3, 2), 0.5, -1, True).sum()
        + tvops.roi_pool(x, rois, 2, 0.5).sum()
    )
    (ref_grad,) = torch.autograd.grad(ref, x)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(grad, ref_grad)


def test_torch_export_keeps_the_custom_ops():
    class Pooler(torch.nn.Module):
        def forward(self, x, rois):
            return roi_align(x, rois, 2, 1.0, 2), roi_pool(x, rois, 2)

    x, rois = torch.randn(1, 2, 8, 8), random_rois(4, 1, 8, 8)
    program = torch.export.export(Pooler(), (x, rois))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert {"detkit.roi_align.default", "detkit.roi_pool.default"} <= targets
    for ours, ref in zip(program.module()(x, rois), Pooler()(x, rois), strict=True):
        torch.testing.assert_close(ours, ref)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda x: roi_align(x, torch.zeros(3, 4), 2), "Tensor\\[K, 5\\]"),
        (lambda x: roi_pool(x, [torch.zeros(3, 5)], 2), "boxes\\[0\\]"),
        (lambda x: roi_align(x, "boxes", 2), "Tensor\\[K, 5\\]"),
        (lambda x: roi_align(x[0], torch.zeros(1, 5), 2), "Tensor\\[N, C, H, W\\]"),
        (lambda x: roi_pool(x, torch.zeros(1, 5), (2, 0)), "output_size"),
        (lambda x: roi_align(x, torch.zeros(1, 5), (1, 2, 3)), "output_size"),
    ],
)
def test_bad_arguments_raise_clear_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call(torch.randn(1, 2, 5, 5))


@pytest.mark.parametrize("index", [2.0, -1.0, 0.5, float("nan")])
@pytest.mark.parametrize("op", [roi_align, roi_pool])
def test_a_batch_index_outside_the_input_is_named(op, index):
    """torchvision's CPU kernels read outside the features (a NaN index wraps to any row)."""
    x = torch.randn(2, 4, 8, 8)
    rois = torch.tensor([[0.0, 1.0, 1.0, 5.0, 5.0], [index, 1.0, 1.0, 5.0, 5.0]])
    with pytest.raises(ValueError, match=r"boxes\[1\] has batch index .* 2 images \(0..1\)"):
        op(x, rois, 2, 1.0)
