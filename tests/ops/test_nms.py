"""detkit.ops.nms against torchvision.ops / torchvision SSD post-processing (the oracles)."""

import math

import pytest
import torch
import torchvision.ops as tv

from detkit import ops
from detkit.testing import torchvision_ssd_postprocess


def random_boxes(n: int, scale: float = 100.0, dtype=torch.float32) -> torch.Tensor:
    xy = torch.rand(n, 2, dtype=torch.float64) * scale
    wh = torch.rand(n, 2, dtype=torch.float64) * scale / 3 + scale / 100
    return torch.cat([xy, xy + wh], dim=1).to(dtype)


def tied_scores(n: int) -> torch.Tensor:
    return (torch.rand(n) * 8).floor() / 8  # many exact ties


@pytest.mark.parametrize("n", [0, 1, 2, 300])
@pytest.mark.parametrize("thr", [0.3, 0.5, 0.6])
def test_nms_matches_torchvision(n, thr):
    boxes = random_boxes(n)
    for scores in (torch.rand(n), tied_scores(n)):
        assert torch.equal(ops.nms(boxes, scores, thr), tv.nms(boxes, scores, thr))


def test_nms_edge_cases():
    boxes = torch.tensor([[0, 0, 10, 10]] * 4 + [[5, 5, 5, 9], [8, 8, 2, 2], [0, 0, 0, 0]]).float()
    scores = torch.tensor([0.5, 0.9, 0.5, 0.9, 0.7, 0.6, 0.6])
    keep = ops.nms(boxes, scores, 0.5)
    assert keep.tolist() == tv.nms(boxes, scores, 0.5).tolist() == [1, 4, 5, 6]
    big = random_boxes(100, scale=1e6)
    s = torch.rand(100)
    assert torch.equal(ops.nms(big, s, 0.5), tv.nms(big, s, 0.5))
    for dtype in (torch.float16, torch.bfloat16):
        small = random_boxes(80, dtype=dtype)
        sc = torch.rand(80).to(dtype)
        assert torch.equal(ops.nms(small, sc, 0.5), tv.nms(small.float(), sc.float(), 0.5))


@pytest.mark.parametrize(("n", "classes"), [(50, 3), (900, 5), (1500, 40)])
def test_batched_nms_matches_torchvision(n, classes):
    # n * 4 > 4000 takes torchvision's (and our) per-class path; smaller the offset trick.
    boxes = random_boxes(n)
    idxs = torch.randint(0, classes, (n,))
    for scores in (torch.rand(n), tied_scores(n)):
        ours = ops.batched_nms(boxes, scores, idxs, 0.5)
        assert torch.equal(ours, tv.batched_nms(boxes, scores, idxs, 0.5))
    empty = ops.batched_nms(boxes[:0], scores[:0], idxs[:0], 0.5)
    assert empty.shape == (0,) and empty.dtype == torch.int64


def test_opcheck_nms_ops():
    boxes, scores = random_boxes(60), torch.rand(60)
    torch.library.opcheck(torch.ops.detkit.nms, (boxes, scores, 0.5))
    idxs = torch.randint(0, 3, (60,))
    torch.library.opcheck(torch.ops.detkit.batched_nms, (boxes, scores, idxs, 0.5))
    b, s = random_boxes(60).view(2, 30, 4), torch.rand(2, 30, 3)
    torch.library.opcheck(torch.ops.detkit.multiclass_nms, (b, s, 0.2, 0.5, 10, 20, None))
    torch.library.opcheck(torch.ops.detkit.multiclass_nms, (b, s, 0.2, 0.5, 10, None, 5))


def per_image_reference(boxes, scores, score_thresh, nms_thresh, detections, pre_nms_top_k):
    """Our documented semantics, one image and one torchvision call at a time."""
    results = []
    for image_boxes, image_scores in zip(boxes, scores, strict=True):
        box_idx, label = torch.nonzero(image_scores > score_thresh, as_tuple=True)
        cand_scores = image_scores[box_idx, label]
        order = torch.sort(label * 10 + 0 * box_idx, stable=True).indices  # (class, box) order
        box_idx, label, cand_scores = box_idx[order], label[order], cand_scores[order]
        if pre_nms_top_k is not None:
            best = torch.sort(cand_scores, descending=True, stable=True).indices[:pre_nms_top_k]
            best = torch.sort(best).values
            box_idx, label, cand_scores = box_idx[best], label[best], cand_scores[best]
        keep = tv.batched_nms(image_boxes[box_idx], cand_scores, label, nms_thresh)[:detections]
        results.append((image_boxes[box_idx][keep], cand_scores[keep], label[keep]))
    return results


def assert_same_detections(ours, reference, max_detections):
    out_boxes, out_scores, out_labels, counts = ours
    assert out_boxes.shape[1] == max_detections
    for i, (boxes, scores, labels) in enumerate(reference):
        k = len(scores)
        assert counts[i] == k
        assert torch.equal(out_boxes[i, :k], boxes.float())
        assert torch.equal(out_scores[i, :k], scores.float())
        assert torch.equal(out_labels[i, :k], labels)
        assert not out_boxes[i, k:].any() and not out_scores[i, k:].any()
        assert not out_labels[i, k:].any()


def detection_batch(batch=3, n=200, classes=6):
    boxes = random_boxes(batch * n).view(batch, n, 4)
    scores = torch.sigmoid(torch.randn(batch, n, classes) * 2 - 3)
    return boxes, scores


@pytest.mark.parametrize("topk", [None, 15])
def test_multiclass_nms_equals_torchvision_torchvision_ssd_postprocess(topk):
    boxes, scores = detection_batch()
    ours = ops.multiclass_nms(boxes, scores, 0.05, 0.45, 25, per_class_top_k=topk or 10**9)
    ref = torchvision_ssd_postprocess(boxes, scores, 0.05, 0.45, 25, topk or 10**9)
    assert_same_detections(ours, ref, 25)


@pytest.mark.parametrize("pre_nms_top_k", [None, 40])
def test_multiclass_nms_per_image_top_k(pre_nms_top_k):
    boxes, scores = detection_batch()
    scores[1] = 0.0  # an image with no candidates at all
    scores[2, :, 1] = 0.5  # ties
    ours = ops.multiclass_nms(boxes, scores, 0.1, 0.5, 30, pre_nms_top_k)
    ref = per_image_reference(boxes, scores, 0.1, 0.5, 30, pre_nms_top_k)
    assert_same_detections(ours, ref, 30)
    assert ours[3][1] == 0


def test_multiclass_nms_class_specific_boxes_half_and_empty():
    boxes, scores = detection_batch(batch=2, n=50, classes=3)
    per_class = boxes[:, :, None].expand(2, 50, 3, 4).clone()
    per_class[:, :, 1] += 3.0
    out = ops.multiclass_nms(per_class, scores, 0.1, 0.5, 150)  # no truncation
    for c in range(3):
        only = scores.clone()
        only[..., [k for k in range(3) if k != c]] = 0
        single = ops.multiclass_nms(per_class[:, :, c], only, 0.1, 0.5, 150)
        for i in range(2):
            mine = out[2][i, : out[3][i]] == c
            assert torch.equal(out[0][i, : out[3][i]][mine], single[0][i, : single[3][i]])
    half = ops.multiclass_nms(boxes.half(), scores.half(), 0.1, 0.5, 20)
    assert half[0].dtype == half[1].dtype == torch.float32
    none = ops.multiclass_nms(boxes[:, :0], scores[:, :0], 0.1, 0.5, 7)
    assert none[0].shape == (2, 7, 4) and none[3].tolist() == [0, 0]


def soft_nms_reference(boxes, scores, sigma, nt, thresh, method):
    """Bodla et al. 2017, Algorithm 1, written with python lists."""
    b_list = list(range(len(boxes)))
    s = scores.double().tolist()
    picked, picked_scores = [], []
    while b_list:
        m = max(b_list, key=lambda i: (s[i], -i))
        b_list.remove(m)
        if s[m] < thresh:
            continue
        picked.append(m)
        picked_scores.append(s[m])
        for i in b_list:
            iou = tv.box_iou(boxes[m : m + 1], boxes[i : i + 1]).item()
            if method == "linear":
                s[i] = s[i] * (1 - iou) if iou >= nt else s[i]
            else:
                s[i] = s[i] * math.exp(-(iou**2) / sigma)
    return picked, picked_scores


@pytest.mark.parametrize("method", ["gaussian", "linear"])
def test_soft_nms_matches_paper_reference(method):
    boxes, scores = random_boxes(40), torch.rand(40)
    keep, new_scores = ops.soft_nms(boxes, scores, 0.5, 0.3, 0.05, method)
    ref_keep, ref_scores = soft_nms_reference(boxes, scores, 0.5, 0.3, 0.05, method)
    assert keep.tolist() == ref_keep
    torch.testing.assert_close(new_scores.double(), torch.tensor(ref_scores, dtype=torch.float64))
    assert bool((new_scores[:-1] >= new_scores[1:]).all())


def test_soft_nms_hand_computed():
    boxes = torch.tensor([[0.0, 0, 2, 2], [1, 0, 3, 2], [10, 10, 11, 11]])  # IoU(0,1) = 1/3
    scores = torch.tensor([0.9, 0.8, 0.5])
    keep, new = ops.soft_nms(boxes, scores, iou_threshold=0.3, method="linear")
    assert keep.tolist() == [0, 1, 2]  # 0.8 * (1 - 1/3) = 0.533 still beats 0.5
    torch.testing.assert_close(new, torch.tensor([0.9, 0.8 * 2 / 3, 0.5]))
    keep, new = ops.soft_nms(boxes, scores, iou_threshold=0.4, method="linear")
    torch.testing.assert_close(new, torch.tensor([0.9, 0.8, 0.5]))  # IoU below threshold
    keep, new = ops.soft_nms(boxes, scores, sigma=0.5, method="gaussian")
    assert keep.tolist() == [0, 1, 2]
    torch.testing.assert_close(new, torch.tensor([0.9, 0.8 * math.exp(-(1 / 9) / 0.5), 0.5]))
    keep, new = ops.soft_nms(boxes[:0], scores[:0])
    assert keep.shape == new.shape == (0,)


def test_nms_bad_inputs():
    with pytest.raises(ValueError, match="nms: scores"):
        ops.nms(random_boxes(3), torch.rand(4), 0.5)
    with pytest.raises(ValueError, match="iou_threshold"):
        ops.nms(random_boxes(3), torch.rand(3), 1.5)
    with pytest.raises(ValueError, match="multiclass_nms: boxes"):
        ops.multiclass_nms(torch.rand(2, 5, 4), torch.rand(2, 6, 3), 0.1, 0.5, 10)
    with pytest.raises(ValueError, match="soft_nms: method"):
        ops.soft_nms(random_boxes(3), torch.rand(3), method="hard")
