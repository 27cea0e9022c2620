"""multiclass_nms against torchvision: ``torchvision.ops.nms`` per image and class with every
documented rule (detkit.testing.torchvision_multiclass_nms), and torchvision SSD's
post-processing, at every density of scores, with and without the top-k rules, and on each
of the CPU engine's three ways to find the suppressions."""

import warnings

import pytest
import torch

from detkit import ops
from detkit.ops import nms_multiclass
from detkit.testing import (
    detection_mismatch,
    torchvision_multiclass_nms,
    torchvision_ssd_postprocess,
)


def spread_boxes(batch: int, n: int, size: float = 300.0, dtype=torch.float32) -> torch.Tensor:
    xy = torch.rand(batch, n, 2, dtype=torch.float64) * size
    wh = torch.rand(batch, n, 2, dtype=torch.float64) * size / 5 + 4
    return torch.cat([xy, xy + wh], dim=-1).to(dtype)


def scores_at(density: str, batch: int, n: int, classes: int) -> torch.Tensor:
    """About 1%, 5% and 40% of the (box, class) pairs above 0.05 (tools/bench_ops.py's)."""
    if density == "trained":
        return torch.sigmoid(torch.randn(batch, n, classes) * 1.3 - 6)
    if density == "softmax":
        return torch.softmax(torch.randn(batch, n, classes + 1) * 1.7, dim=-1)[..., 1:]
    return torch.sigmoid(torch.randn(batch, n, classes) - 3.2)


def check(boxes, scores, k, pre=None, per_class=None, score_threshold=0.05, iou=0.45):
    ours = ops.multiclass_nms(
        boxes, scores, score_threshold, iou, k, pre, per_class_top_k=per_class
    )
    ref = torchvision_multiclass_nms(boxes, scores, score_threshold, iou, k, pre, per_class)
    assert ours[0].shape == (boxes.shape[0], k, 4)
    mismatch = detection_mismatch(ours, ref)
    assert mismatch is None, mismatch
    return ours


SHARE_ABOVE_THRESHOLD = {"trained": (0.005, 0.02), "softmax": (0.03, 0.08), "untrained": (0.3, 0.5)}


@pytest.mark.parametrize("density", ["trained", "softmax", "untrained"])
@pytest.mark.parametrize(("pre", "per_class"), [(None, None), (None, 40), (300, None), (300, 40)])
def test_equals_reference_at_each_density(density, pre, per_class):
    boxes, scores = spread_boxes(4, 300), scores_at(density, 4, 300, 80)
    low, high = SHARE_ABOVE_THRESHOLD[density]
    assert low < float((scores > 0.05).float().mean()) < high
    scores[1] = 0.0  # an image without candidates
    scores[2, 2:], scores[2, :, 30:] = 0.0, 0.0  # fewer candidates than max_detections
    out = check(boxes, scores, 100, pre, per_class)
    assert out[3][1] == 0 and 0 < out[3][2] < 100


@pytest.mark.parametrize("density", ["trained", "untrained"])
def test_equals_torchvision_ssd_postprocess(density):
    # Past 1000 candidates per image torchvision's batched_nms runs NMS per class, as we do.
    boxes, scores = spread_boxes(2, 800), scores_at(density, 2, 800, 20)
    ours = ops.multiclass_nms(boxes, scores, 0.05, 0.45, 150, per_class_top_k=60)
    ref = torchvision_ssd_postprocess(boxes, scores, 0.05, 0.45, 150, 60)
    assert detection_mismatch(ours, ref, ties_in_any_order=True) is None


def test_exact_ties_everywhere():
    # Scores in steps of 1/16: ties at the per-class and per-image cut-offs, inside NMS and in
    # the final ranking. Equal scores go to the lower box, then the lower class.
    boxes = spread_boxes(3, 300)
    scores = (torch.rand(3, 300, 8) * 16).floor() / 16
    for pre, per_class in ((None, None), (None, 25), (120, None), (120, 25)):
        check(boxes, scores, 60, pre, per_class, score_threshold=0.3)
    identical = boxes.clone()
    identical[:, 100:200] = identical[:, :1]  # one box repeated, all scores equal
    check(identical, torch.full((3, 300, 2), 0.5), 60, 80, 30)


@pytest.mark.parametrize("sparse", [0, 10**9], ids=["candidates-sorted", "boxes-sorted"])
def test_both_candidate_orders_equal_reference(monkeypatch, sparse):
    # Both ways to put the candidates in (image, class, x1) order, on boxes sharing x1 values
    # (ties must keep box order) and on float64 boxes (two stable sorts instead of one key).
    monkeypatch.setattr(nms_multiclass, "_SPARSE", sparse)
    boxes = spread_boxes(3, 400)
    boxes[..., 0::2] = boxes[..., 0::2].round(decimals=-1)  # x1 (and x2) on a 10-pixel grid
    boxes[..., 2] = torch.maximum(boxes[..., 2], boxes[..., 0] + 1)
    for density in ("trained", "softmax"):
        scores = scores_at(density, 3, 400, 6)
        check(boxes, scores, 80, 300, 40)
        check(boxes, scores, 80)
        check(boxes.double(), scores.double(), 80)


def test_inputs_that_require_grad_give_the_same_detections_without_warnings():
    # A model's predict_padded run with autograd on hands selection tensors that need grad.
    boxes, scores = spread_boxes(2, 300), scores_at("trained", 2, 300, 5)
    expected = ops.multiclass_nms(boxes, scores, 0.05, 0.45, 50)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = ops.multiclass_nms(boxes.requires_grad_(), scores.requires_grad_(), 0.05, 0.45, 50)
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    assert not any(t.requires_grad for t in got)


def test_class_specific_boxes():
    boxes = spread_boxes(2, 120)
    per_class = torch.stack([boxes, boxes + 2.0, boxes.flip(1)], dim=2)  # [B, N, C, 4]
    scores = scores_at("untrained", 2, 120, 3)
    for pre, per_class_top_k in ((None, None), (90, 20)):
        check(per_class, scores, 150, pre, per_class_top_k)


def test_edge_arguments():
    boxes, scores = spread_boxes(2, 200), scores_at("untrained", 2, 200, 5)
    scores[0, :10, 0] = float("nan")  # never a candidate (NaN > threshold is false)
    check(boxes, scores, 0)
    check(boxes, scores, 50, 0)
    check(boxes, scores, 50, None, 0)
    check(boxes, scores, 50, 10**6, 10**6)
    check(boxes, scores, 2000)  # more slots than candidates
    empty = ops.multiclass_nms(boxes[:, :0], scores[:, :0], 0.1, 0.5, 7)
    assert empty[0].shape == (2, 7, 4) and empty[3].tolist() == [0, 0]
    far = boxes * 1e4 + 1e7  # large coordinates: the x-windows' float line must not lose pairs
    check(far, scores, 80)
    check(far.double() - 3e7, scores.double(), 80)


class Engines:
    """Records which way the CPU engine found the suppressions."""

    def __init__(self, monkeypatch):
        self.used = []
        for name in ("_class_edges", "_torchvision_keep"):
            original = getattr(nms_multiclass, name)

            def spy(*args, original=original, name=name):
                self.used.append(name)
                return original(*args)

            monkeypatch.setattr(nms_multiclass, name, spy)
        original_edges = nms_multiclass.window_edges

        def edges(boxes, *args):
            self.used.append("windows")
            return original_edges(boxes, *args)

        monkeypatch.setattr(nms_multiclass, "window_edges", edges)


def test_engine_per_class_windows(monkeypatch):
    engines = Engines(monkeypatch)
    check(spread_boxes(2, 600), scores_at("softmax", 2, 600, 40), 100, per_class=50)
    assert engines.used == ["windows"]


def test_engine_per_image_windows(monkeypatch):
    # Dense scores on shared boxes: each pair of boxes is a pair in most classes.
    engines = Engines(monkeypatch)
    check(spread_boxes(2, 600), torch.rand(2, 600, 12), 300, score_threshold=0.1)
    assert engines.used == ["windows", "_class_edges"]


def test_engine_torchvision_per_group(monkeypatch):
    # Boxes piled up in one place: the windows would hold every pair of a group.
    engines = Engines(monkeypatch)
    pile = torch.tensor([50.0, 50, 90, 90]) + torch.randn(2, 500, 4)
    check(pile, torch.rand(2, 500, 3), 100, score_threshold=0.2, iou=0.7)
    assert engines.used == ["_torchvision_keep"]
    engines.used.clear()
    boxes = spread_boxes(2, 100)
    boxes[0, 3, 2] = float("inf")  # non-finite boxes: torchvision's arithmetic, as is
    check(boxes, scores_at("untrained", 2, 100, 3), 50)
    assert engines.used == ["_torchvision_keep"]
