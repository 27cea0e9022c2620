"""Triton launchers (run on CPU under TRITON_INTERPRET=1) against the CPU custom ops."""

import pytest
import torch
import torchvision.ops as tv

from detkit import ops

kernels = pytest.importorskip("detkit.ops.kernels.boxes_nms")


def random_boxes(n: int, scale: float = 100.0) -> torch.Tensor:
    xy = torch.rand(n, 2) * scale
    return torch.cat([xy, xy + torch.rand(n, 2) * scale / 3 + 1], dim=1)


def test_box_iou_kernel():
    a, b = random_boxes(40), random_boxes(70)
    a[:3] = torch.tensor([[5.0, 5, 5, 9], [8, 8, 2, 2], [0, 0, 10, 10]])  # degenerate boxes
    ours = kernels.box_iou(a, b)
    assert torch.equal(ours, ops.box_iou(a, b))
    batched = kernels.box_iou(a[None].expand(2, -1, -1), b[:9].half()[None])
    assert batched.dtype == torch.float32
    assert torch.equal(batched, ops.box_iou(a[None].expand(2, -1, -1), b[:9].half()[None]))
    assert kernels.box_iou(a[:0], b).shape == (0, 70)
    wide = kernels.box_iou(a.double(), b.double())  # float64 stays float64, bit for bit
    assert wide.dtype == torch.float64 and torch.equal(wide, ops.box_iou(a.double(), b.double()))


def test_nms_kernel_with_ties():
    boxes = random_boxes(90)
    scores = (torch.rand(90) * 6).floor() / 6
    boxes[10:14] = boxes[0]  # identical boxes
    for thr in (0.3, 0.6):
        assert torch.equal(kernels.nms(boxes, scores, thr), tv.nms(boxes, scores, thr))
    assert kernels.nms(boxes[:0], scores[:0], 0.5).shape == (0,)


@pytest.mark.parametrize(("n", "classes"), [(60, 3), (1001, 40)])
def test_batched_nms_kernel(n, classes):
    boxes, scores = random_boxes(n, 300.0), torch.rand(n)
    idxs = torch.randint(0, classes, (n,))
    assert torch.equal(
        kernels.batched_nms(boxes, scores, idxs, 0.5), ops.batched_nms(boxes, scores, idxs, 0.5)
    )


def test_multiclass_nms_kernel():
    boxes = random_boxes(2 * 60).view(2, 60, 4)
    scores = torch.sigmoid(torch.randn(2, 60, 4) * 2 - 2)
    for pre, per_class in ((None, None), (30, 8)):
        ours = kernels.multiclass_nms(boxes, scores, 0.1, 0.5, 25, pre, per_class)
        ref = ops.multiclass_nms(boxes, scores, 0.1, 0.5, 25, pre, per_class_top_k=per_class)
        for got, want in zip(ours, ref, strict=True):
            assert torch.equal(got, want)
