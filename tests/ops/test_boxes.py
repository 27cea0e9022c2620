"""detkit.ops.boxes against torchvision.ops (the oracle) on random inputs and edge cases."""

import pytest
import torch
import torchvision.ops as tv

from detkit import ops


def random_boxes(n: int, scale: float = 100.0, dtype=torch.float32) -> torch.Tensor:
    xy = torch.rand(n, 2, dtype=torch.float64) * scale
    wh = torch.rand(n, 2, dtype=torch.float64) * scale / 3 + scale / 100
    return torch.cat([xy, xy + wh], dim=1).to(dtype)


def edge_boxes() -> torch.Tensor:
    """Zero-area, inverted, identical and ordinary boxes mixed."""
    return torch.tensor(
        [
            [0, 0, 10, 10],
            [0, 0, 10, 10],
            [5, 5, 5, 9],
            [8, 8, 2, 2],
            [0, 0, 0, 0],
            [1, 1, 11, 11],
            [3, 3, 20, 7],
        ],
        dtype=torch.float32,
    )


@pytest.mark.parametrize("in_fmt", ["xyxy", "xywh", "cxcywh"])
@pytest.mark.parametrize("out_fmt", ["xyxy", "xywh", "cxcywh"])
def test_box_convert_matches_torchvision(in_fmt, out_fmt):
    boxes = random_boxes(20)
    torch.testing.assert_close(
        ops.box_convert(boxes, in_fmt, out_fmt), tv.box_convert(boxes, in_fmt, out_fmt)
    )


def test_area_clip_remove_small_match_torchvision():
    boxes = torch.cat([random_boxes(30, 200) - 50, edge_boxes()])
    torch.testing.assert_close(ops.box_area(boxes), tv.box_area(boxes))
    torch.testing.assert_close(
        ops.clip_boxes(boxes, (120, 90)), tv.clip_boxes_to_image(boxes, (120, 90))
    )
    assert torch.equal(ops.remove_small_boxes(boxes, 8.0), tv.remove_small_boxes(boxes, 8.0))


@pytest.mark.parametrize("scale", [1.0, 100.0, 1e6])
def test_box_iou_bitwise_equal_to_torchvision(scale):
    a = torch.cat([random_boxes(37, scale), edge_boxes() * scale / 10])
    b = torch.cat([random_boxes(23, scale), edge_boxes() * scale / 10])
    ours, ref = ops.box_iou(a, b), tv.box_iou(a, b)
    assert torch.equal(ours.isnan(), ref.isnan())  # 0/0 for the degenerate pairs
    assert torch.equal(ours.nan_to_num(-1), ref.nan_to_num(-1))
    assert ours[37, 24] == ours[38, 23] == 1.0  # identical boxes


def test_box_iou_hand_computed_and_empty():
    a = torch.tensor([[0.0, 0, 2, 2]])
    b = torch.tensor([[1.0, 1, 3, 3], [0, 0, 2, 2], [5, 5, 6, 6]])
    torch.testing.assert_close(ops.box_iou(a, b), torch.tensor([[1 / 7, 1.0, 0.0]]))
    assert ops.box_iou(a[:0], b).shape == (0, 3)
    assert ops.box_iou(a, b[:0]).shape == (1, 0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_give_float32(dtype):
    a, b = random_boxes(15, dtype=dtype), random_boxes(9, dtype=dtype)
    iou = ops.box_iou(a, b)
    assert iou.dtype == torch.float32
    assert torch.equal(iou, tv.box_iou(a.float(), b.float()))
    for fn in (ops.generalized_box_iou, ops.distance_box_iou, ops.complete_box_iou):
        assert fn(a, b).dtype == torch.float32
    assert ops.giou_loss(a[:9], b).dtype == torch.float32


def test_batched_box_iou():
    a, b = random_boxes(24).view(2, 12, 4), random_boxes(10).view(2, 5, 4)
    out = ops.box_iou(a, b)
    assert out.shape == (2, 12, 5)
    assert torch.equal(out, tv.box_iou(a, b))


@pytest.mark.parametrize(
    ("ours", "ref"),
    [
        (ops.generalized_box_iou, tv.generalized_box_iou),
        (ops.distance_box_iou, tv.distance_box_iou),
        (ops.complete_box_iou, tv.complete_box_iou),
    ],
)
def test_iou_variants_match_torchvision(ours, ref):
    a, b = random_boxes(31), random_boxes(17)
    torch.testing.assert_close(ours(a, b), ref(a, b), rtol=1e-6, atol=1e-6)


LOSSES = [
    (ops.giou_loss, tv.generalized_box_iou_loss),
    (ops.diou_loss, tv.distance_box_iou_loss),
    (ops.ciou_loss, tv.complete_box_iou_loss),
]


@pytest.mark.parametrize(("ours", "ref"), LOSSES)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_losses_match_torchvision(ours, ref, reduction):
    a, b = random_boxes(40), random_boxes(40)
    a[:3] = b[:3]  # perfect overlap: loss 0
    for eps in (1e-7, 1e-2):
        torch.testing.assert_close(
            ours(a, b, reduction=reduction, eps=eps), ref(a, b, reduction=reduction, eps=eps)
        )
    empty = ours(a[:0], b[:0], reduction=reduction)
    torch.testing.assert_close(empty, ref(a[:0], b[:0], reduction=reduction))


@pytest.mark.parametrize(("ours", "ref"), LOSSES)
def test_loss_gradients(ours, ref):
    a = random_boxes(6, dtype=torch.float64).requires_grad_()
    b = random_boxes(6, dtype=torch.float64).requires_grad_()
    if ours is not ops.ciou_loss:  # CIoU's alpha is a constant by design: no finite-diff check
        assert torch.autograd.gradcheck(lambda x, y: ours(x, y, reduction="sum"), (a, b))
    ga = torch.autograd.grad(ours(a, b, reduction="mean"), a)[0]
    gr = torch.autograd.grad(ref(a, b, reduction="mean"), a)[0]
    torch.testing.assert_close(ga, gr)


def test_box_iou_custom_op_gradients_and_opcheck():
    a = random_boxes(5, dtype=torch.float64).requires_grad_()
    b = random_boxes(4, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(ops.box_iou, (a, b))
    grad = torch.autograd.grad(ops.box_iou(a, b).sum(), a)[0]
    torch.testing.assert_close(grad, torch.autograd.grad(tv.box_iou(a, b).sum(), a)[0])
    torch.library.opcheck(torch.ops.detkit.box_iou, (a, b))
    torch.library.opcheck(torch.ops.detkit.box_iou, (random_boxes(3).half(), random_boxes(2)))


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="box_convert: in_fmt"):
        ops.box_convert(random_boxes(2), "xyz", "xyxy")
    with pytest.raises(ValueError, match="box_iou"):
        ops.box_iou(torch.zeros(3, 5), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="reduction"):
        ops.giou_loss(random_boxes(2), random_boxes(2), reduction="avg")
