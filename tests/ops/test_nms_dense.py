"""multiclass_nms's few-candidate path (the dense IoU table) against the per-image, per-class
``torchvision.ops.nms`` oracle, and the hand-over to the general engine."""

import pytest
import torch

from detkit import ops
from detkit.ops import nms_dense
from detkit.testing import detection_mismatch, torchvision_multiclass_nms


@pytest.fixture
def dense_calls(monkeypatch):
    """Every call's outcome: True when the dense table answered, False when it handed over."""
    calls = []
    original = nms_dense.dense_select

    def spy(*args):
        out = original(*args)
        calls.append(out is not None)
        return out

    monkeypatch.setattr("detkit.ops.nms_multiclass.dense_select", spy)
    return calls


def boxes_and_scores(batch, n, classes, seed, logit_mean=-5.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(batch, n, 2, generator=g, dtype=torch.float64) * 200
    wh = torch.rand(batch, n, 2, generator=g, dtype=torch.float64) * 60 + 4
    boxes = torch.cat([xy, xy + wh], -1).to(dtype)
    scores = torch.sigmoid(torch.randn(batch, n, classes, generator=g) + logit_mean).to(dtype)
    return boxes, scores


def check(boxes, scores, k, pre=None, per_class=None, threshold=0.05, iou=0.45):
    ours = ops.multiclass_nms(boxes, scores, threshold, iou, k, pre, per_class_top_k=per_class)
    ref = torchvision_multiclass_nms(boxes, scores, threshold, iou, k, pre, per_class)
    mismatch = detection_mismatch(ours, ref)
    assert mismatch is None, mismatch
    return ours


@pytest.mark.parametrize("seed", range(4))
def test_few_candidates_equal_the_oracle(dense_calls, monkeypatch, seed):
    # Up to a few hundred candidates (the table's limit raised so every call takes it),
    # clustered boxes so that NMS suppresses, some images without candidates.
    monkeypatch.setattr(nms_dense, "DENSE_ELEMENTS", 10**12)
    boxes, scores = boxes_and_scores(4, 300, 6, seed, logit_mean=-3.5)
    scores[1] = 0.0
    out = check(boxes, scores, 100)
    assert out[3][1] == 0 and int(out[3].sum()) > 20
    check(boxes, scores, 5)  # more survivors than K: the K best by score, class, box
    check(boxes, scores, 0)
    check(boxes.double(), scores.double(), 50, iou=0.6)  # float64: 0.6 compared as itself
    per_class = torch.stack([boxes, boxes + 3.0, boxes.flip(1)] * 2, dim=2)  # [B, N, C, 4]
    check(per_class, scores, 60)
    assert dense_calls and all(dense_calls)


def test_exact_ties(dense_calls, monkeypatch):
    monkeypatch.setattr(nms_dense, "DENSE_ELEMENTS", 10**12)
    boxes, _ = boxes_and_scores(2, 150, 4, 7)
    scores = (torch.rand(2, 150, 4, generator=torch.Generator().manual_seed(3)) * 8).floor() / 8
    check(boxes, scores, 40, threshold=0.6)
    same = boxes.clone()
    same[:, 20:60] = same[:, :1]  # one box repeated with equal scores: lower box first
    check(same, torch.full((2, 150, 2), 0.5), 30, threshold=0.4)
    assert all(dense_calls)


def test_greedy_not_fast_nms(dense_calls):
    # A (0.9) suppresses B (0.8), B overlaps C (0.7), A does not overlap C: greedy keeps A and
    # C; Fast-NMS (suppression by any higher box, kept or not) would drop C as well.
    boxes = torch.tensor([[[0.0, 0, 10, 10], [4, 0, 14, 10], [8, 0, 18, 10]]])
    scores = torch.tensor([[[0.9], [0.8], [0.7]]])
    out = check(boxes, scores, 3, iou=0.3)
    assert out[3].tolist() == [2] and out[1][0, :2].tolist() == pytest.approx([0.9, 0.7])
    assert dense_calls == [True]


def test_the_general_engine_takes_over(dense_calls):
    boxes, scores = boxes_and_scores(1, 400, 10, 1, logit_mean=-5.5)
    above = int((scores > 0.05).sum())
    assert above > 10 and above**2 <= nms_dense.DENSE_ELEMENTS
    check(boxes, scores, 100)  # few: the table
    check(boxes, scores, 100, pre=above - 1)  # the per-image top-k would cut
    check(boxes, scores, 100, per_class=2)  # the per-class top-k might cut
    check(boxes, scores, 100, threshold=0.005)  # too many for the table
    far = boxes.clone()
    far[0, (scores[0] > 0.05).any(-1).nonzero()[0], 2] = float("inf")  # a candidate not finite
    check(far, scores, 100)
    assert dense_calls == [True, False, False, False, False]


def test_no_candidates():
    boxes, scores = boxes_and_scores(3, 50, 4, 2)
    out = ops.multiclass_nms(boxes, torch.zeros_like(scores), 0.05, 0.5, 10)
    assert out[0].shape == (3, 10, 4) and out[3].tolist() == [0, 0, 0]
    assert not any(t.any() for t in out[:3])


@pytest.mark.parametrize(
    "kind", ["degenerate", "inverted", "far", "integer", "half", "ties", "inf_scores", "repeated"]
)
def test_odd_inputs_equal_the_oracle_and_the_general_engine(monkeypatch, kind):
    g = torch.Generator().manual_seed(len(kind))
    for _ in range(6):
        xy = torch.rand(2, 60, 2, generator=g) * 100
        boxes = torch.cat([xy, xy + torch.rand(2, 60, 2, generator=g) * 40], -1)
        scores = torch.rand(2, 60, 3, generator=g)
        if kind == "degenerate":
            boxes[..., 2] = boxes[..., 0]  # zero width: IoU 0 / 0
        elif kind == "inverted":
            boxes = boxes[..., [2, 3, 0, 1]]  # x2 < x1
        elif kind == "far":
            boxes = boxes * 1e5 + 1e7
        elif kind == "integer":
            boxes = boxes.round().int()
        elif kind == "half":
            boxes, scores = boxes.half(), scores.half()
        elif kind == "ties":
            scores = (scores * 4).floor() / 4
        elif kind == "inf_scores":
            scores[..., 0] = float("inf")
        elif kind == "repeated":
            boxes[:, 1:] = boxes[:, :1]
        args = (boxes, scores, 0.25, 0.5, 20)
        monkeypatch.setattr(nms_dense, "DENSE_ELEMENTS", 10**12)
        dense = ops.multiclass_nms(*args)
        monkeypatch.setattr(nms_dense, "DENSE_ELEMENTS", -1)
        general = ops.multiclass_nms(*args)
        assert all(torch.equal(a, b) for a, b in zip(dense, general, strict=True))
        ref = torchvision_multiclass_nms(boxes.float(), scores.float(), 0.25, 0.5, 20)
        assert detection_mismatch(dense, ref) is None
